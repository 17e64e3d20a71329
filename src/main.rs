//! The `threadline` binary: parses the command line, sets up logging, and hands over to
//! the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = threadline::cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("THREADLINE_LOG").unwrap_or_else(|_| {
        let default = if matches!(cli.command, threadline::cli::Command::Serve { .. }) {
            "threadline=info"
        } else {
            "threadline=warn"
        };
        tracing_subscriber::EnvFilter::new(default)
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    runtime.block_on(threadline::cli::run(cli))
}
