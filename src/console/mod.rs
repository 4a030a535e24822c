//! The analyst console: a review queue, cases, one-click verdicts and an overview, in the
//! browser, served by `fraudgate serve` on its HTTP listener (`--http-listen`, formerly
//! `--metrics-listen`, which keeps working) at `/`; the same data as JSON under `/api/v1/`.
//!
//! A door like gRPC: it reads the journal and the case tables (`cases.rs`) and gives
//! verdicts through [`Node::feedback_by`], the path `ReportFeedback` takes, so a verdict is
//! journaled (with the user's name) and changes the counters the next `Score` reads. Pages
//! are askama templates compiled into the binary (escaped by default: every value from a
//! transaction is attacker-controlled); no JavaScript at all, charts are inline SVG drawn
//! here. Every response carries a `Content-Security-Policy` that forbids scripts; the
//! session cookie is `HttpOnly` and `SameSite=Strict` (and `Secure` when `--console-secure`
//! says the console is behind TLS); every state-changing form carries the session's CSRF
//! token; logins are rate-limited; the API takes `Authorization: Bearer <token>`.
//!
//! Shared as `Arc<Console>`; what it serves arrives through a cell once start-up has made
//! the node (until then pages answer 503).

mod admin_pages;
pub mod cases;
mod pages;
pub mod session;
pub mod users;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::admin::ModelAdmin;
use crate::metrics::Metrics;
use crate::node::Node;
use crate::rules_admin::RulesAdmin;
use cases::Cases;
use session::{Session, Sessions};
use users::{Role, Users};

/// What the console serves from, once start-up has made it.
pub struct Served {
    pub node: Arc<Node>,
    pub models: Arc<ModelAdmin>,
    pub rules: Arc<RulesAdmin>,
    /// None without a data directory: no journal, no queue.
    pub cases: Option<Arc<Cases>>,
}

/// The console: users, sessions, and (once started) the node it shows.
pub struct Console {
    pub users: Users,
    pub sessions: Sessions,
    pub metrics: Arc<Metrics>,
    /// `Secure` on the session cookie (the console is reached over TLS).
    pub secure_cookie: bool,
    /// Set once start-up has made the node; taken back at shutdown, so the node's last
    /// holder can close its journal.
    parts: parking_lot::RwLock<Option<Arc<Served>>>,
    /// Decisions per minute by outcome (allow, review, deny), the last hour, oldest first:
    /// (minute since the epoch, counts at its start).
    minutes: parking_lot::Mutex<std::collections::VecDeque<(i64, [u64; 3])>>,
    /// The queue's depth and oldest case, counted in the background every few seconds (a
    /// count over every open case is too slow for a page that refreshes itself).
    depth: parking_lot::Mutex<Option<(u64, Option<String>)>>,
}

impl Console {
    pub fn new(users: Users, metrics: Arc<Metrics>, secure_cookie: bool) -> Console {
        Console {
            users,
            sessions: Sessions::default(),
            metrics,
            secure_cookie,
            parts: parking_lot::RwLock::new(None),
            minutes: parking_lot::Mutex::default(),
            depth: parking_lot::Mutex::default(),
        }
    }

    /// Counts the queue again (off the async workers); the overview shows the last count.
    pub async fn refresh_depth(&self) {
        let Ok(cases) = self.cases() else {
            return;
        };
        match tokio::task::spawn_blocking(move || cases.depth()).await {
            Ok(Ok(depth)) => *self.depth.lock() = Some(depth),
            Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "counting the review queue"),
            Err(e) => tracing::warn!(error = %e, "counting the review queue"),
        }
    }

    /// The last count of the queue, counting it now if there is none yet.
    pub async fn depth(&self) -> Option<(u64, Option<String>)> {
        if self.depth.lock().is_none() {
            self.refresh_depth().await;
        }
        self.depth.lock().clone()
    }

    /// Records the decision counters at the start of this minute (called every few
    /// seconds; keeps the last hour).
    pub fn sample(&self) {
        let minute = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64 / 60);
        let mut minutes = self.minutes.lock();
        if minutes.back().is_some_and(|(m, _)| *m == minute) {
            return;
        }
        minutes.push_back((minute, self.metrics.decision_counts().map(|(_, n)| n)));
        while minutes.len() > 61 {
            minutes.pop_front();
        }
    }

    /// Decisions in each of the last minutes by outcome, oldest first, the current
    /// (partial) minute last.
    pub fn per_minute(&self) -> Vec<(i64, [u64; 3])> {
        let minutes = self.minutes.lock();
        let now = self.metrics.decision_counts().map(|(_, n)| n);
        let mut out = Vec::with_capacity(minutes.len());
        for (i, (minute, at)) in minutes.iter().enumerate() {
            let next = minutes.get(i + 1).map_or(now, |(_, n)| *n);
            out.push((*minute, [0, 1, 2].map(|k| next[k].saturating_sub(at[k]))));
        }
        out
    }

    /// Connects the console to what start-up made.
    pub fn set_parts(&self, served: Served) {
        *self.parts.write() = Some(Arc::new(served));
    }

    /// Disconnects it (shutdown): later pages answer 503.
    pub fn take_parts(&self) {
        self.parts.write().take();
    }

    fn parts(&self) -> Result<Arc<Served>, Failure> {
        self.parts
            .read()
            .clone()
            .ok_or_else(|| Failure::Unavailable("fraudgate is starting or stopping".into()))
    }

    fn cases(&self) -> Result<Arc<Cases>, Failure> {
        self.parts()?.cases.clone().ok_or_else(|| {
            Failure::Unavailable(
                "this server keeps no data directory (--ephemeral, or a cluster node): there is \
                 no journal, so no review queue and no cases"
                    .into(),
            )
        })
    }
}

/// The console's routes (merged into the HTTP listener's router beside `/metrics`).
pub fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/", get(pages::overview))
        .route("/login", get(pages::login_form).post(pages::login))
        .route("/logout", post(pages::logout))
        .route("/queue", get(pages::queue))
        .route("/queue/next", post(pages::next_case))
        .route("/cases/{id}", get(pages::case))
        .route("/cases/{id}/verdict", post(pages::verdict))
        .route("/cases/{id}/note", post(pages::note))
        .route("/cases/{id}/escalate", post(pages::escalate))
        .route("/search", get(pages::search))
        .route(
            "/rules",
            get(admin_pages::rules).post(admin_pages::put_rule),
        )
        .route("/lists", post(admin_pages::list_entry))
        .route("/models", get(admin_pages::models))
        .route("/models/promote", post(admin_pages::promote))
        .route("/models/rollback", post(admin_pages::rollback))
        .route("/static/console.css", get(pages::stylesheet))
        .route("/api/v1/review-queue", get(pages::api_queue))
        .route("/api/v1/cases/{id}", get(pages::api_case))
        .route("/api/v1/cases/{id}/verdict", post(pages::api_verdict))
        .layer(axum::middleware::map_response(secure_headers))
        .with_state(console)
}

/// Headers on every console response: no scripts, no framing, no sniffing, no caching.
async fn secure_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Why a console request was not served.
#[derive(Debug)]
pub enum Failure {
    /// No session: the login page (HTML) or 401 (API).
    LoggedOut,
    Forbidden(String),
    BadRequest(String),
    NotFound(String),
    Unavailable(String),
    Internal(String),
}

impl Failure {
    fn status(&self) -> StatusCode {
        match self {
            Failure::LoggedOut => StatusCode::UNAUTHORIZED,
            Failure::Forbidden(_) => StatusCode::FORBIDDEN,
            Failure::BadRequest(_) => StatusCode::BAD_REQUEST,
            Failure::NotFound(_) => StatusCode::NOT_FOUND,
            Failure::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Failure::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn message(&self) -> &str {
        match self {
            Failure::LoggedOut => "log in first",
            Failure::Forbidden(m)
            | Failure::BadRequest(m)
            | Failure::NotFound(m)
            | Failure::Unavailable(m)
            | Failure::Internal(m) => m,
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Internal(format!("{e:#}"))
    }
}

impl IntoResponse for Failure {
    /// HTML pages: the login page for a missing session, else a page saying why.
    fn into_response(self) -> Response {
        if matches!(self, Failure::LoggedOut) {
            return Redirect::to("/login").into_response();
        }
        (
            self.status(),
            pages::error_page(self.status(), self.message()),
        )
            .into_response()
    }
}

/// The same failures for `/api/v1/`: JSON `{"error": ...}` with the status.
pub struct ApiFailure(pub Failure);

impl From<Failure> for ApiFailure {
    fn from(f: Failure) -> Self {
        ApiFailure(f)
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        (
            self.0.status(),
            axum::Json(serde_json::json!({ "error": self.0.message() })),
        )
            .into_response()
    }
}

/// A request's logged-in user, from the session cookie.
pub struct Viewer {
    pub session: Session,
    pub session_id: String,
}

impl Viewer {
    /// Refuses below `role`.
    pub fn require(&self, role: Role) -> Result<(), Failure> {
        if self.session.role >= role {
            Ok(())
        } else {
            Err(Failure::Forbidden(format!(
                "{} may not do this: it needs the {} role",
                self.session.user,
                role.name()
            )))
        }
    }
}

impl FromRequestParts<Arc<Console>> for Viewer {
    type Rejection = Failure;

    async fn from_request_parts(
        parts: &mut Parts,
        console: &Arc<Console>,
    ) -> Result<Self, Self::Rejection> {
        let id = parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(session::cookie_value)
            .ok_or(Failure::LoggedOut)?;
        let session = console.sessions.get(id).ok_or(Failure::LoggedOut)?;
        Ok(Viewer {
            session,
            session_id: id.to_owned(),
        })
    }
}

/// An API caller, from `Authorization: Bearer <token>`.
pub struct ApiUser {
    pub name: String,
    pub role: Role,
}

impl FromRequestParts<Arc<Console>> for ApiUser {
    type Rejection = ApiFailure;

    async fn from_request_parts(
        parts: &mut Parts,
        console: &Arc<Console>,
    ) -> Result<Self, Self::Rejection> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then_some(token.trim())
            })
            .ok_or(ApiFailure(Failure::LoggedOut))?;
        let user = console
            .users
            .by_token(token)
            .ok_or(ApiFailure(Failure::LoggedOut))?;
        Ok(ApiUser {
            name: user.name.clone(),
            role: user.role,
        })
    }
}

/// The client's address, when the listener gives it.
pub fn client_addr(info: Option<&ConnectInfo<SocketAddr>>) -> Option<std::net::IpAddr> {
    info.map(|c| c.0.ip())
}
