//! `dlock exec` (being written).

use std::process::ExitCode;

/// Arguments of `dlock exec`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `dlock exec`.
pub fn main(_args: Args) -> ExitCode {
    eprintln!("dlock exec: not written yet");
    ExitCode::from(2)
}
