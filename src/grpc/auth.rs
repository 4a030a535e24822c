//! Bearer-token authentication for the scoring service: a call must carry
//! `authorization: Bearer <token>` with one of the configured tokens, compared in constant
//! time; otherwise UNAUTHENTICATED. Health and reflection stay open (probes and tooling do not
//! hold secrets). Tokens come from a file (one per line) or the `FRAUDGATE_TOKENS`
//! environment variable (comma-separated), and are never logged.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use subtle::ConstantTimeEq;
use tonic::{Request, Status};

/// The accepted tokens. Cloned into every connection's interceptor; shares the list.
#[derive(Clone)]
pub struct Tokens(Arc<Vec<Vec<u8>>>);

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} configured)", self.0.len())
    }
}

impl Tokens {
    /// Tokens from `text`: split on newlines and commas, blanks and `#` comments ignored.
    pub fn parse(text: &str) -> anyhow::Result<Tokens> {
        let tokens: Vec<Vec<u8>> = text
            .split(['\n', ','])
            .map(str::trim)
            .filter(|t| !t.is_empty() && !t.starts_with('#'))
            .map(|t| t.as_bytes().to_vec())
            .collect();
        anyhow::ensure!(!tokens.is_empty(), "no tokens given");
        anyhow::ensure!(
            tokens.iter().all(|t| t.len() >= 16),
            "every token must be at least 16 characters long"
        );
        Ok(Tokens(Arc::new(tokens)))
    }

    pub fn from_file(path: &Path) -> anyhow::Result<Tokens> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the token file {}", path.display()))?;
        Tokens::parse(&text).with_context(|| format!("token file {}", path.display()))
    }

    /// Whether `presented` is one of the tokens. Every token is compared in full, in time
    /// that does not depend on where (or whether) a match is.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        self.0.iter().fold(0u8, |found, t| {
            found | t.as_slice().ct_eq(presented).unwrap_u8()
        }) == 1
    }

    /// The interceptor: admits calls with an accepted bearer token.
    pub fn check(&self, req: Request<()>) -> Result<Request<()>, Status> {
        let presented = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match presented {
            Some(token) if self.accepts(token.as_bytes()) => Ok(req),
            Some(_) => Err(Status::unauthenticated("the bearer token is not accepted")),
            None => Err(Status::unauthenticated(
                "missing \"authorization: Bearer <token>\" metadata",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_and_match_exactly() {
        let t = Tokens::parse("# ops\nalpha-0123456789abcdef\n\nbeta-0123456789abcdef, ").unwrap();
        assert!(t.accepts(b"alpha-0123456789abcdef"));
        assert!(t.accepts(b"beta-0123456789abcdef"));
        assert!(!t.accepts(b"alpha-0123456789abcde"));
        assert!(!t.accepts(b""));
        assert!(Tokens::parse("short").is_err());
        assert!(Tokens::parse("# nothing\n").is_err());
    }
}
