//! The `dlock` command (being written).

fn main() {
    eprintln!("dlock: the command line is not written yet");
    std::process::exit(2);
}
