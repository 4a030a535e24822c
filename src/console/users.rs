//! The console's users, from the file given with `--console-users`: a name, a role, and a
//! password hashed with argon2 (for the browser) and/or a token (for `/api/v1/` scripts).
//!
//! ```toml
//! [[user]]
//! name = "ana"
//! role = "analyst"                 # viewer, analyst or admin
//! password = "$argon2id$v=19$..."  # from `fraudgate hash-password`
//! token = "a-long-random-token"    # optional: Authorization: Bearer <token> on /api/v1/
//! ```
//!
//! Read once at start; shared read-only as `Arc<Users>`. Only hashes are kept for passwords;
//! tokens are compared in constant time.

use std::path::Path;

use anyhow::Context;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::error::Usage;

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Every page; no changes.
    Viewer,
    /// Verdicts, notes, escalation.
    Analyst,
    /// Models, rules and lists too.
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Analyst => "analyst",
            Role::Admin => "admin",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserFile {
    #[serde(default)]
    user: Vec<UserEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    name: String,
    role: Role,
    password: Option<String>,
    token: Option<String>,
}

/// One user as the console knows them.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub role: Role,
    password: Option<String>,
    token: Option<Vec<u8>>,
}

/// Every user.
#[derive(Debug, Clone, Default)]
pub struct Users {
    users: Vec<User>,
}

/// Shortest API token accepted.
const MIN_TOKEN: usize = 16;

impl Users {
    /// Reads and checks a users file.
    pub fn load(path: &Path) -> anyhow::Result<Users> {
        let text = std::fs::read_to_string(path)
            .with_context(|| Usage(format!("reading --console-users {}", path.display())))?;
        Users::parse(&text).with_context(|| Usage(format!("--console-users {}", path.display())))
    }

    pub fn parse(text: &str) -> anyhow::Result<Users> {
        let file: UserFile = toml::from_str(text).context("parsing the users file")?;
        let mut users = Vec::with_capacity(file.user.len());
        for (i, u) in file.user.into_iter().enumerate() {
            let at = format!("user[{i}] ({:?})", u.name);
            anyhow::ensure!(
                !u.name.is_empty()
                    && u.name.len() <= 64
                    && u.name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b)),
                "{at}: name must be 1 to 64 of A-Z a-z 0-9 - _ . @"
            );
            anyhow::ensure!(
                users.iter().all(|o: &User| o.name != u.name),
                "{at}: the name is taken by an earlier user"
            );
            anyhow::ensure!(
                u.password.is_some() || u.token.is_some(),
                "{at}: give a password (argon2 hash from `fraudgate hash-password`) or a token"
            );
            if let Some(p) = &u.password {
                PasswordHash::new(p).map_err(|e| {
                    anyhow::anyhow!(
                        "{at}: password is not an argon2 hash ({e}); make one with \
                         `fraudgate hash-password`"
                    )
                })?;
            }
            if let Some(t) = &u.token {
                anyhow::ensure!(
                    t.len() >= MIN_TOKEN,
                    "{at}: token must be at least {MIN_TOKEN} characters"
                );
            }
            users.push(User {
                name: u.name,
                role: u.role,
                password: u.password,
                token: u.token.map(String::into_bytes),
            });
        }
        Ok(Users { users })
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The user whose name and password these are. Slow on purpose (argon2): call it off the
    /// async workers.
    pub fn login(&self, name: &str, password: &str) -> Option<&User> {
        let user = self.users.iter().find(|u| u.name == name)?;
        let hash = PasswordHash::new(user.password.as_deref()?).ok()?;
        Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .ok()
            .map(|()| user)
    }

    /// The user holding `token`.
    pub fn by_token(&self, token: &str) -> Option<&User> {
        self.users.iter().find(|u| {
            u.token
                .as_deref()
                .is_some_and(|t| bool::from(t.ct_eq(token.as_bytes())))
        })
    }
}

/// An argon2id hash of `password`, as the users file takes it.
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    anyhow::ensure!(
        password.chars().count() >= 8,
        "a console password needs at least 8 characters"
    );
    Ok(Argon2::default()
        .hash_password(password.as_bytes())
        .map_err(|e| anyhow::anyhow!("hashing the password: {e}"))?
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_tokens() {
        let hash = hash_password("correct horse").expect("hash");
        let users = Users::parse(&format!(
            "[[user]]\nname = \"ana\"\nrole = \"analyst\"\npassword = \"{hash}\"\n\
             [[user]]\nname = \"bot\"\nrole = \"viewer\"\ntoken = \"0123456789abcdef0\"\n"
        ))
        .expect("valid");
        assert_eq!(
            users.login("ana", "correct horse").map(|u| u.role),
            Some(Role::Analyst)
        );
        assert!(users.login("ana", "wrong").is_none());
        assert!(users.login("bot", "anything").is_none());
        assert_eq!(
            users.by_token("0123456789abcdef0").map(|u| u.name.as_str()),
            Some("bot")
        );
        assert!(users.by_token("0123456789abcdef").is_none());
        assert!(
            Users::parse("[[user]]\nname = \"x\"\nrole = \"admin\"\npassword = \"plain\"\n")
                .is_err()
        );
        assert!(Users::parse(
            "[[user]]\nname = \"x\"\nrole = \"boss\"\ntoken = \"0123456789abcdef0\"\n"
        )
        .is_err());
        assert!(hash_password("short").is_err());
    }
}
