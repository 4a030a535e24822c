//! Settings from the environment and from a TOML file, for every flag of a subcommand
//! (`serve`): precedence flag > `FRAUDGATE_*` environment variable > file > default.
//!
//! clap does the first two (each flag gets `env = "FRAUDGATE_<NAME>"`) and the parsing of
//! every value; the file is turned into extra `--name=value` arguments for the settings that
//! neither the command line nor the environment gave, and the command line is parsed again.
//! So a value means the same in all three places and is checked by the same code.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};

/// Prefix of every environment variable.
pub const ENV_PREFIX: &str = "FRAUDGATE_";

/// The environment variable of the argument `id` (`data_dir` -> `FRAUDGATE_DATA_DIR`).
pub fn env_name(id: &str) -> String {
    format!("{ENV_PREFIX}{}", id.to_ascii_uppercase())
}

/// Gives the global flags of `cmd` and every flag of its subcommand `sub` an environment
/// variable.
pub fn with_env(cmd: Command, sub: &str) -> Command {
    let add = |a: Arg| {
        if a.get_long().is_some() && a.get_env().is_none() {
            let name = env_name(a.get_id().as_str());
            a.env(clap::builder::OsStr::from(clap::builder::Str::from(name)))
        } else {
            a
        }
    };
    cmd.mut_args(add).mut_subcommand(sub, |s| s.mut_args(add))
}

/// Where a setting's value came from.
pub fn source_name(source: Option<ValueSource>) -> &'static str {
    match source {
        Some(ValueSource::CommandLine) => "flag",
        Some(ValueSource::EnvVariable) => "env",
        Some(ValueSource::DefaultValue) | None => "default",
        Some(_) => "other",
    }
}

/// The settings a file gave, as extra command-line arguments.
#[derive(Debug, Default)]
pub struct FileArgs {
    /// `--name=value` (or `--name` for a switch), one per setting used.
    pub args: Vec<OsString>,
    /// The argument ids those came from, to report each setting's source.
    pub ids: Vec<String>,
}

/// The arguments that the file at `path` adds to a command line whose subcommand `sub` of
/// `cmd` was parsed into `matches`: one `--name=value` per setting in the file that the
/// command line and the environment left at its default. Unknown names and values that are
/// not scalars are errors naming the setting.
pub fn file_args(
    cmd: &Command,
    sub: &str,
    matches: &ArgMatches,
    path: &Path,
) -> anyhow::Result<FileArgs> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    let table: toml::Table = toml::from_str(&text)
        .with_context(|| format!("parsing the config file {}", path.display()))?;
    let subcommand = cmd
        .find_subcommand(sub)
        .with_context(|| format!("no subcommand {sub}"))?;
    let mut used = FileArgs::default();
    for (key, value) in &table {
        let id = key.replace('-', "_");
        let arg = subcommand
            .get_arguments()
            .chain(cmd.get_arguments())
            .find(|a| a.get_id() == id.as_str() && a.get_long().is_some() && id != "config")
            .with_context(|| {
                format!(
                    "config file {}: unknown setting `{key}` (settings are the flags of \
                     `fraudgate {sub}`, without the dashes)",
                    path.display()
                )
            })?;
        let given = |id: &str| {
            matches!(
                matches.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        };
        // Set higher up, or in conflict with something set higher up (a file's
        // `durability` under `--ephemeral`): the higher place wins.
        let overruled = subcommand.get_arguments().any(|other| {
            given(other.get_id().as_str())
                && subcommand
                    .get_arguments()
                    .any(|a| a.get_id() == arg.get_id())
                && (subcommand
                    .get_arg_conflicts_with(arg)
                    .iter()
                    .any(|c| c.get_id() == other.get_id())
                    || subcommand
                        .get_arg_conflicts_with(other)
                        .iter()
                        .any(|c| c.get_id() == arg.get_id()))
        });
        if given(&id) || overruled {
            continue;
        }
        let long = arg.get_long().unwrap_or(key);
        let flag = matches!(arg.get_action(), ArgAction::SetTrue);
        let text = match value {
            toml::Value::Boolean(true) if flag => {
                used.args.push(format!("--{long}").into());
                used.ids.push(id);
                continue;
            }
            toml::Value::Boolean(false) if flag => continue,
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_) => {
                value.to_string()
            }
            _ => anyhow::bail!(
                "config file {}: `{key}` must be a string, number or boolean",
                path.display()
            ),
        };
        used.args.push(format!("--{long}={text}").into());
        used.ids.push(id);
    }
    Ok(used)
}

/// Parses `argv` with `cmd` (its subcommand `sub` given environment variables), and, when
/// that subcommand names a `--config` file, again with the file's settings added. Returns
/// the matches and the ids of the settings the file gave.
pub fn matches(
    cmd: Command,
    sub: &str,
    argv: Vec<OsString>,
) -> anyhow::Result<(ArgMatches, Vec<String>)> {
    let cmd = with_env(cmd, sub);
    let matches = cmd.clone().try_get_matches_from(&argv)?;
    let Some(path) = matches
        .subcommand_matches(sub)
        .and_then(|m| m.get_one::<std::path::PathBuf>("config"))
    else {
        return Ok((matches, Vec::new()));
    };
    let file = file_args(&cmd, sub, subcommand_matches(&matches, sub)?, path)?;
    let argv = argv.into_iter().chain(file.args);
    let matches = cmd
        .try_get_matches_from(argv)
        .with_context(|| format!("a setting in the config file {}", path.display()))?;
    Ok((matches, file.ids))
}

fn subcommand_matches<'a>(matches: &'a ArgMatches, sub: &str) -> anyhow::Result<&'a ArgMatches> {
    matches
        .subcommand_matches(sub)
        .with_context(|| format!("no {sub} settings"))
}

/// A duration flag's value: `7d`, `36h`, `90s`.
pub fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e} (try 7d, 36h, 90s)"))
}

/// A duration, or none (`off`).
#[derive(Debug, Clone, Copy)]
pub struct DurationOrOff(pub Option<Duration>);

/// A duration flag's value that may be `off`.
pub fn duration_or_off(text: &str) -> Result<DurationOrOff, String> {
    if text == "off" {
        return Ok(DurationOrOff(None));
    }
    duration(text).map(|d| DurationOrOff(Some(d)))
}
