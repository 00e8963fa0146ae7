//! Subcommands of the `kiln` CLI that live outside `main.rs`.

pub mod bench;
pub mod diff;
pub mod inspect;
pub mod teacher_force;
