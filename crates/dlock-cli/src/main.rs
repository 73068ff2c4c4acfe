//! `dlock`: run a command under a distributed lock (`exec`), show what a
//! lock does for data consistency (`demo`), and measure a backend
//! (`bench`).

mod bench;
mod demo;
mod exec;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Distributed locks from the command line.
#[derive(Parser, Debug)]
#[command(name = "dlock", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a command while holding a lock, like flock(1) for a cluster.
    Exec(exec::Args),
    /// Show lost updates without a lock, and how locks and fencing fix them.
    Demo(demo::Args),
    /// Measure lock+unlock cycles against the raw protocol floor.
    Bench(bench::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Exec(args) => exec::main(args),
        Command::Demo(args) => demo::main(args),
        Command::Bench(args) => bench::main(args),
    }
}
