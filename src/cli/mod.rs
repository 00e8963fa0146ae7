//! Subcommands of the `kiln` CLI that live outside `main.rs`.

pub mod bench;
pub mod inspect;
pub mod teacher_force;
