//! `dlock demo` (being written).

use std::process::ExitCode;

/// Arguments of `dlock demo`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `dlock demo`.
pub fn main(_args: Args) -> ExitCode {
    eprintln!("dlock demo: not written yet");
    ExitCode::from(2)
}
