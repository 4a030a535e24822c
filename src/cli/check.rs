//! `fraudgate config check FILE`: the settings `serve --config FILE` would run with here,
//! checked (every file they name loads) and printed with where each came from.

use std::path::PathBuf;

use anyhow::Context;
use clap::CommandFactory;

use super::{Cli, Command};
use crate::config;
use crate::error::Usage;
use crate::serve::build_engine;

/// `fraudgate config check FILE`.
pub fn check_config(file: PathBuf) -> anyhow::Result<()> {
    let argv = [
        "fraudgate".into(),
        "serve".into(),
        "--config".into(),
        file.clone().into_os_string(),
    ];
    let (cli, matches, from_file) =
        Cli::parse_with_sources(argv.to_vec()).context(Usage(format!("{}", file.display())))?;
    let Command::Serve(args) = cli.command else {
        anyhow::bail!("parsed as another command");
    };
    let env_tokens = std::env::var("FRAUDGATE_TOKENS").ok();
    let config = args
        .resolve(env_tokens.as_deref())
        .context(Usage(format!("{}", file.display())))?;
    if let Some(tls) = &config.tls {
        tls.load()?;
    }
    // The registry of the data directory is not read: the check must not need its lock.
    build_engine(&config, &crate::registry::ModelRegistry::open(None)?)?;
    let serve = matches
        .subcommand_matches("serve")
        .context("no serve settings")?;
    let settings = config::with_env(Cli::command(), "serve");
    let settings = settings
        .find_subcommand("serve")
        .context("no serve command")?;
    println!(
        "# {}: ok; the settings `serve --config` would run with here",
        file.display()
    );
    let roles = |t: &Option<crate::grpc::auth::Tokens>| match t {
        Some(t) => format!("{} token(s): {}", t.names().len(), t.names().join(", ")),
        None => "none".to_owned(),
    };
    println!("# scoring role (FraudScorer): {}", roles(&config.tokens));
    println!(
        "# admin role (ModelAdmin): {}",
        match (&config.admin_tokens, &config.tokens) {
            (None, Some(_)) => "none: ModelAdmin calls are refused (PERMISSION_DENIED)".to_owned(),
            (None, None) => "none: open, as everything (no tokens configured)".to_owned(),
            (admin, _) => roles(admin),
        }
    );
    let root = Cli::command();
    for arg in root.get_arguments().chain(settings.get_arguments()) {
        let (Some(long), id) = (arg.get_long(), arg.get_id().as_str()) else {
            continue;
        };
        let source = if from_file.iter().any(|f| f == id) {
            "file"
        } else {
            config::source_name(serve.value_source(id))
        };
        match serve.get_raw(id) {
            Some(values) => {
                let values: Vec<_> = values.map(|v| v.to_string_lossy()).collect();
                println!("{long} = {:?}  # {source}", values.join(","));
            }
            None => println!("# {long}: not set"),
        }
    }
    Ok(())
}
