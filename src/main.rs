//! The `coremq` command: `serve` runs the broker; the other subcommands are
//! clients of a running broker (see `coremq --help`).

use clap::{Parser, Subcommand};
use std::process::ExitCode;

// Shards and client threads allocate many small, short-lived buffers (a
// batch's copy, a request's topic names); glibc's malloc spent 10-20% of
// their time in its free lists (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "coremq",
    version,
    about = "coremq: a thread-per-core, io_uring message broker",
    long_about = "coremq: a thread-per-core, io_uring message broker.\n\n\
        Start a broker with `coremq serve` (data in ./coremq-data, clients on 127.0.0.1:9700),\n\
        then use `coremq topic`, `coremq produce` and `coremq consume` against it."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker: one pinned shard per CPU, until SIGINT/SIGTERM.
    Serve(coremq::config::ServeArgs),
    #[command(flatten)]
    Client(coremq::cli::ClientCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match cli.command {
        Command::Serve(args) => {
            let config = match coremq::config::Config::resolve(&args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            match coremq::server::run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Client(cmd) => coremq::cli::run_client(cmd),
    }
}
