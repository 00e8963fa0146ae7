//! Subcommands of the `kiln` CLI that live outside `main.rs`.

pub mod bench;
pub mod diff;
pub mod eval;
pub mod inspect;
pub mod loadtest;
pub mod serve;
pub mod teacher_force;
pub mod throughput;

/// Token ids written on the command line: separated by commas or spaces, JSON brackets allowed
/// (`1 2,3`, `[1, 2, 3]`); a word that is not an id is an error naming it.
pub fn parse_ids<'a>(args: impl IntoIterator<Item = &'a str>) -> anyhow::Result<Vec<u32>> {
    use anyhow::Context;
    args.into_iter()
        .flat_map(|a| a.split(|c: char| c == ',' || c.is_whitespace() || c == '[' || c == ']'))
        .filter(|w| !w.is_empty())
        .map(|w| {
            w.parse::<u32>()
                .with_context(|| format!("`{w}` is not a token id"))
        })
        .collect()
}
