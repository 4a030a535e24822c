//! `fraudgate`: a thin binary over the library's command line ([`fraudgate::cli`]).

use fraudgate::cli::Cli;
use fraudgate::error::Usage;

/// mimalloc rather than glibc's malloc: every call allocates on a runtime worker and the
/// journal writer frees on its own thread, which glibc's arenas make costly (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runs the command; every error that ends it is printed as one `error:` line with its
/// causes and never a backtrace (`RUST_LOG=debug` adds the debug form), exit code 2 for bad
/// flags, config or input files and 1 for failures at run time.
fn main() -> std::process::ExitCode {
    let cli = match Cli::parse_with_sources(std::env::args_os().collect()) {
        Ok((cli, _, _)) => cli,
        Err(e) => match e.downcast::<clap::Error>() {
            Ok(clap_error) => clap_error.exit(),
            Err(e) => return report(e.context(Usage("the command line".into()))),
        },
    };
    match cli.run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => report(e),
    }
}

fn report(e: anyhow::Error) -> std::process::ExitCode {
    eprintln!("error: {e:#}");
    if std::env::var("RUST_LOG").is_ok_and(|l| l.contains("debug")) {
        eprintln!("\n{e:?}");
    }
    std::process::ExitCode::from(fraudgate::error::exit_code(&e))
}
