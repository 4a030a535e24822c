//! Console sessions: a random id in an `HttpOnly`, `SameSite=Strict` cookie, the user and a
//! CSRF token kept here (in memory: a restart logs everyone out), idle sessions expired. And
//! the login limiter: failed attempts per user name and per client address.
//!
//! Shared by every console request as part of `Console`; each map entry is locked only for
//! the lookup.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use rand::RngCore;
use subtle::ConstantTimeEq;

use super::users::Role;

/// The session cookie's name.
pub const COOKIE: &str = "fraudgate_session";
/// A session unused for this long is gone.
pub const IDLE: Duration = Duration::from_secs(8 * 3600);
/// Failed logins allowed per name and per address in [`WINDOW`].
const MAX_FAILURES: u32 = 5;
const WINDOW: Duration = Duration::from_secs(300);

/// One logged-in user.
#[derive(Debug, Clone)]
pub struct Session {
    pub user: String,
    pub role: Role,
    /// Every state-changing form carries it; compared in constant time.
    pub csrf: String,
    last_seen: Instant,
}

impl Session {
    pub fn csrf_ok(&self, given: &str) -> bool {
        bool::from(self.csrf.as_bytes().ct_eq(given.as_bytes()))
    }
}

/// Sessions and login failures.
#[derive(Debug, Default)]
pub struct Sessions {
    live: DashMap<String, Session>,
    failures: DashMap<String, (u32, Instant)>,
}

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Sessions {
    /// Opens a session; returns its id (the cookie's value).
    pub fn open(&self, user: &str, role: Role) -> String {
        let id = random_hex();
        self.live.insert(
            id.clone(),
            Session {
                user: user.to_owned(),
                role,
                csrf: random_hex(),
                last_seen: Instant::now(),
            },
        );
        id
    }

    /// The session with this id, if it is live (and marks it used).
    pub fn get(&self, id: &str) -> Option<Session> {
        let mut entry = self.live.get_mut(id)?;
        if entry.last_seen.elapsed() > IDLE {
            drop(entry);
            self.live.remove(id);
            return None;
        }
        entry.last_seen = Instant::now();
        Some(entry.clone())
    }

    pub fn close(&self, id: &str) {
        self.live.remove(id);
    }

    /// Drops idle sessions and old failure counts.
    pub fn sweep(&self) {
        self.live.retain(|_, s| s.last_seen.elapsed() <= IDLE);
        self.failures
            .retain(|_, (_, since)| since.elapsed() <= WINDOW);
    }

    fn keys(name: &str, addr: Option<IpAddr>) -> [String; 2] {
        [
            format!("name:{name}"),
            format!("addr:{}", addr.map_or_else(String::new, |a| a.to_string())),
        ]
    }

    /// Whether a login for `name` from `addr` may be tried now.
    pub fn may_try(&self, name: &str, addr: Option<IpAddr>) -> bool {
        Sessions::keys(name, addr).iter().all(|k| {
            self.failures
                .get(k)
                .is_none_or(|f| f.0 < MAX_FAILURES || f.1.elapsed() > WINDOW)
        })
    }

    /// Counts a failed login.
    pub fn failed(&self, name: &str, addr: Option<IpAddr>) {
        for k in Sessions::keys(name, addr) {
            let mut f = self.failures.entry(k).or_insert((0, Instant::now()));
            if f.1.elapsed() > WINDOW {
                *f = (0, Instant::now());
            }
            f.0 += 1;
        }
    }

    /// A successful login clears the name's failures.
    pub fn succeeded(&self, name: &str) {
        self.failures.remove(&format!("name:{name}"));
    }
}

/// The session id in a `Cookie` header, if any.
pub fn cookie_value(header: &str) -> Option<&str> {
    header
        .split(';')
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_csrf_and_the_limiter() {
        let s = Sessions::default();
        let id = s.open("ana", Role::Analyst);
        let session = s.get(&id).expect("live");
        assert!(session.csrf_ok(&session.csrf) && !session.csrf_ok("forged"));
        s.close(&id);
        assert!(s.get(&id).is_none());
        let addr = Some("192.0.2.1".parse().expect("ip"));
        for _ in 0..5 {
            assert!(s.may_try("ana", addr));
            s.failed("ana", addr);
        }
        assert!(!s.may_try("ana", addr));
        assert!(!s.may_try("bob", addr), "the address is limited too");
        assert_eq!(cookie_value("a=1; fraudgate_session=xyz; b=2"), Some("xyz"));
    }
}
