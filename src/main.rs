//! keygate's entry point; the command itself is `keygate::main`.

fn main() -> std::process::ExitCode {
    keygate::main()
}
