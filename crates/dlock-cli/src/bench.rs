//! `dlock bench` (being written).

use std::process::ExitCode;

/// Arguments of `dlock bench`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `dlock bench`.
pub fn main(_args: Args) -> ExitCode {
    eprintln!("dlock bench: not written yet");
    ExitCode::from(2)
}
