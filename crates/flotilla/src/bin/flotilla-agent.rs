//! `flotilla-agent`: `flotilla agent` alone, for nodes, where its smaller code is less memory.

fn main() -> std::process::ExitCode {
    flotilla_cli::agent_main()
}
