//! `flotilla`: the one binary (see the library for the commands).

fn main() -> std::process::ExitCode {
    flotilla_cli::main()
}
