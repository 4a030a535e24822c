//! Errors that end a command, made for the person who ran it.
//!
//! The binary prints every such error as one `error: ...` line with its cause chain and no
//! backtrace, and exits 2 when the fault is in what the person gave (a flag, a config file,
//! an input file) and 1 when something failed at run time. [`Usage`] is how a library
//! function marks an error as the first kind: it is attached as `anyhow` context, and the
//! binary finds it anywhere in the chain. [`bind`] makes the message of a listener that
//! cannot bind name the flag that chose the address and what to do about it.

use std::net::SocketAddr;

/// Marks an error as caused by a flag, a config file or an input file (exit code 2). Its
/// text is the context line shown, e.g. `reading /data/payments.csv`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `e` was marked [`Usage`] anywhere in its chain.
pub fn is_usage(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Usage>().is_some()
}

/// The exit code for `e`: 2 for bad flags, config or input files, 1 otherwise.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if is_usage(e) {
        2
    } else {
        1
    }
}

/// The error of a listener for `flag` that could not bind `addr`: names the flag, says when
/// another process holds the port, and what fixes it (`extra`, e.g. "or `off`").
pub fn bind(flag: &str, addr: SocketAddr, e: std::io::Error, extra: &str) -> anyhow::Error {
    let why = match e.kind() {
        std::io::ErrorKind::AddrInUse => format!(
            "another process (perhaps another fraudgate) already listens on {addr}; stop it, \
             or give {flag} another address{extra}"
        ),
        std::io::ErrorKind::AddrNotAvailable => format!(
            "{} is not an address of this machine; give {flag} one of its addresses \
             (127.0.0.1, 0.0.0.0){extra}",
            addr.ip()
        ),
        std::io::ErrorKind::PermissionDenied => format!(
            "port {} needs privileges; give {flag} a port above 1023{extra}",
            addr.port()
        ),
        _ => format!("give {flag} another address{extra}"),
    };
    anyhow::Error::new(e)
        .context(why)
        .context(format!("{flag} {addr}: cannot listen"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn usage_is_found_anywhere_in_the_chain() {
        let inner: anyhow::Result<()> = Err(anyhow::anyhow!("line 3: bad"));
        let e = inner
            .context(Usage("reading x.csv".into()))
            .context("training")
            .unwrap_err();
        assert!(is_usage(&e));
        assert_eq!(exit_code(&e), 2);
        assert_eq!(format!("{e:#}"), "training: reading x.csv: line 3: bad");
        assert_eq!(exit_code(&anyhow::anyhow!("disk full")), 1);
    }

    #[test]
    fn a_busy_port_names_the_flag() {
        let addr: SocketAddr = "127.0.0.1:9464".parse().unwrap();
        let e = bind(
            "--metrics-listen",
            addr,
            std::io::Error::from(std::io::ErrorKind::AddrInUse),
            ", or off",
        );
        let text = format!("{e:#}");
        assert!(
            text.starts_with("--metrics-listen 127.0.0.1:9464: cannot listen"),
            "{text}"
        );
        assert!(text.contains("another process"), "{text}");
        assert!(text.contains(", or off"), "{text}");
    }
}
