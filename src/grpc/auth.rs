//! Bearer-token authentication with two roles. A call must carry `authorization: Bearer
//! <token>` (the scheme in any case, RFC 7235) with a token of the role its service needs,
//! compared in constant time:
//!
//! - *scoring* tokens (`--token-file` or `FRAUDGATE_TOKENS`) open `FraudScorer` only;
//! - *admin* tokens (`--admin-token-file`) open `ModelAdmin` (and every admin service added
//!   later) only. A payment service's credential must not be able to change the model that
//!   decides every payment, so with scoring tokens and no admin tokens, admin calls are
//!   refused with PERMISSION_DENIED.
//!
//! An unknown token is UNAUTHENTICATED; a known token of the other role is
//! PERMISSION_DENIED. With no tokens at all (a loopback development server) everything is
//! open. Health and reflection stay open (probes and tooling hold no secrets).
//!
//! Each token has a name (`name:token` in the file; a bare token is named by its line,
//! `line-3`, or in `FRAUDGATE_TOKENS` by its position, `token-2`). The interceptor puts the
//! name into the request's extensions as a [`Caller`], so changes record *who* made them;
//! tokens themselves are never logged or stored.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use subtle::ConstantTimeEq;
use tonic::{Request, Status};

/// The name of the token a call was admitted with, in the request's extensions (absent when
/// the server has no tokens).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller(pub Arc<str>);

impl Caller {
    /// The caller's name for a record: the token's name, or `anonymous` without tokens.
    pub fn name_of<T>(req: &Request<T>) -> Arc<str> {
        req.extensions()
            .get::<Caller>()
            .map_or_else(|| Arc::from("anonymous"), |c| Arc::clone(&c.0))
    }
}

/// One role's tokens, with their names. Cloned into every connection's interceptor; shares
/// the list.
#[derive(Clone)]
pub struct Tokens(Arc<Vec<(Arc<str>, Vec<u8>)>>);

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({:?})", self.names())
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
}

impl Tokens {
    /// Tokens from a file's text: one per line, `name:token` or a bare token (named
    /// `line-<n>`); blank lines and `#` comments ignored. Commas also separate tokens on one
    /// line, for compatibility with older files.
    pub fn parse(text: &str) -> anyhow::Result<Tokens> {
        let mut tokens = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let items: Vec<&str> = line
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .collect();
            if items.first().is_none_or(|t| t.starts_with('#')) {
                continue;
            }
            let several = items.len() > 1;
            for (k, item) in items.into_iter().enumerate() {
                let default = if several {
                    format!("line-{}-{}", n + 1, k + 1)
                } else {
                    format!("line-{}", n + 1)
                };
                tokens.push(Self::entry(item, default).with_context(|| format!("line {}", n + 1))?);
            }
        }
        Self::finish(tokens)
    }

    /// Tokens from `FRAUDGATE_TOKENS`: comma-separated, `name:token` or bare (named
    /// `token-<k>`).
    pub fn parse_list(text: &str) -> anyhow::Result<Tokens> {
        let tokens = text
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .enumerate()
            .map(|(k, item)| {
                Self::entry(item, format!("token-{}", k + 1))
                    .with_context(|| format!("entry {}", k + 1))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Self::finish(tokens)
    }

    fn entry(item: &str, default: String) -> anyhow::Result<(Arc<str>, Vec<u8>)> {
        let (name, token) = match item.split_once(':') {
            Some((name, token)) if valid_name(name.trim()) => {
                (name.trim().to_owned(), token.trim())
            }
            Some((name, _)) => anyhow::bail!(
                "{name:?} is not a token name (letters, digits, '-', '_', '.', '@'; \
                 write name:token, or the token alone)"
            ),
            None => (default, item),
        };
        anyhow::ensure!(
            token.len() >= 16,
            "the token of {name:?} is shorter than 16 characters"
        );
        Ok((name.into(), token.as_bytes().to_vec()))
    }

    fn finish(tokens: Vec<(Arc<str>, Vec<u8>)>) -> anyhow::Result<Tokens> {
        anyhow::ensure!(!tokens.is_empty(), "no tokens given");
        for (i, (name, _)) in tokens.iter().enumerate() {
            anyhow::ensure!(
                !tokens[..i].iter().any(|(n, _)| n == name),
                "the name {name:?} is given to two tokens"
            );
        }
        Ok(Tokens(Arc::new(tokens)))
    }

    pub fn from_file(path: &Path) -> anyhow::Result<Tokens> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the token file {}", path.display()))?;
        Tokens::parse(&text).with_context(|| format!("token file {}", path.display()))
    }

    /// The tokens' names, in order.
    pub fn names(&self) -> Vec<&str> {
        self.0.iter().map(|(n, _)| &**n).collect()
    }

    /// The name of `presented` if it is one of the tokens. Every token is compared in full,
    /// in time that does not depend on where (or whether) a match is.
    pub fn find(&self, presented: &[u8]) -> Option<Arc<str>> {
        let mut found = None;
        for (name, token) in self.0.iter() {
            if bool::from(token.as_slice().ct_eq(presented)) {
                found = Some(Arc::clone(name));
            }
        }
        found
    }

    /// Whether `presented` is one of the tokens.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        self.find(presented).is_some()
    }
}

/// Which role a service needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Scoring,
    Admin,
}

/// Both roles' tokens: what the interceptors check. Cloned into every connection.
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub scoring: Option<Tokens>,
    pub admin: Option<Tokens>,
}

/// The token of an `authorization` value, if it is `Bearer <token>` (scheme in any case).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(char::is_whitespace)?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

impl Access {
    /// No tokens at all: every call is admitted.
    pub fn is_open(&self) -> bool {
        self.scoring.is_none() && self.admin.is_none()
    }

    /// The interceptor of a service needing `role`: admits the call (its [`Caller`] in the
    /// extensions) or refuses it.
    pub fn check(&self, role: Role, mut req: Request<()>) -> Result<Request<()>, Status> {
        let (own, other) = match role {
            Role::Scoring => (&self.scoring, &self.admin),
            Role::Admin => (&self.admin, &self.scoring),
        };
        if own.is_none() {
            return match (role, other) {
                // No scoring tokens: scoring is open (as without any tokens).
                (Role::Scoring, _) | (Role::Admin, None) => Ok(req),
                (Role::Admin, Some(_)) => Err(Status::permission_denied(
                    "ModelAdmin needs an admin token, and this server has none: start it with \
                     --admin-token-file (scoring tokens never administer)",
                )),
            };
        }
        let value = req
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap_or(""));
        let Some(value) = value else {
            return Err(Status::unauthenticated(
                "missing \"authorization: Bearer <token>\" metadata",
            ));
        };
        let Some(token) = bearer(value) else {
            return Err(Status::unauthenticated(
                "the authorization metadata must be \"Bearer <token>\"",
            ));
        };
        if let Some(name) = own.as_ref().and_then(|t| t.find(token.as_bytes())) {
            req.extensions_mut().insert(Caller(name));
            return Ok(req);
        }
        if other.as_ref().is_some_and(|t| t.accepts(token.as_bytes())) {
            return Err(Status::permission_denied(match role {
                Role::Scoring => "this is an admin token: it may not score (list it in the scoring tokens too if it must)",
                Role::Admin => "this is a scoring token: ModelAdmin needs a token from --admin-token-file",
            }));
        }
        Err(Status::unauthenticated("the bearer token is not accepted"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_with_and_without_names() {
        let t = Tokens::parse(
            "# ops\nalpha-0123456789abcdef\n\npayments:beta-0123456789abcdef\ngamma-0123456789abcdef, delta-0123456789abcdef",
        )
        .unwrap();
        assert_eq!(
            t.names(),
            ["line-2", "payments", "line-5-1", "line-5-2"],
            "bare tokens are named by their line"
        );
        assert_eq!(
            t.find(b"beta-0123456789abcdef").as_deref(),
            Some("payments")
        );
        assert!(t.accepts(b"alpha-0123456789abcdef"));
        assert!(!t.accepts(b"alpha-0123456789abcde"));
        assert!(!t.accepts(b""));
        assert!(Tokens::parse("short").is_err());
        assert!(Tokens::parse("# nothing\n").is_err());
        assert!(Tokens::parse("a:0123456789abcdef0\na:0123456789abcdef1").is_err());
        let env = Tokens::parse_list("one-0123456789abcdef,ops:two-0123456789abcdef").unwrap();
        assert_eq!(env.names(), ["token-1", "ops"]);
    }

    #[test]
    fn the_scheme_is_case_insensitive() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc"), Some("abc"));
        assert_eq!(bearer("BEARER  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer"), None);
        assert_eq!(bearer("abc"), None);
    }
}
