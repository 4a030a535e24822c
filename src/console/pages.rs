//! The console's pages and its JSON API: each handler reads through `Cases` (off the async
//! workers) or the node, renders an askama template (escaped) or JSON.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use askama::Template;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Form, Json};
use serde::Deserialize;

use super::cases::{Case, Filter, Payment};
use super::session::COOKIE;
use super::users::Role;
use super::{ApiFailure, ApiUser, Console, Failure, Viewer};
use crate::domain::{Decision, NodeError};
use crate::proto;

/// Runs blocking work (SQLite, argon2) off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> Result<T, Failure> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Failure::Internal(format!("a console task stopped: {e}")))?
        .map_err(Failure::from)
}

pub(super) fn render(page: impl Template) -> Response {
    match page.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("rendering the page: {e}"),
        )
            .into_response(),
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    user: Option<&'a str>,
    role: &'a str,
    csrf: &'a str,
    status: String,
    message: &'a str,
}

/// The page a failure shows.
pub fn error_page(status: StatusCode, message: &str) -> Response {
    render(ErrorPage {
        user: None,
        role: "",
        csrf: "",
        status: status.to_string(),
        message,
    })
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage<'a> {
    user: Option<&'a str>,
    role: &'a str,
    csrf: &'a str,
    no_users: bool,
    message: Option<&'a str>,
}

pub async fn login_form(State(console): State<Arc<Console>>) -> Response {
    render(LoginPage {
        user: None,
        role: "",
        csrf: "",
        no_users: console.users.is_empty(),
        message: None,
    })
}

#[derive(Deserialize)]
pub struct LoginForm {
    name: String,
    password: String,
}

pub async fn login(
    State(console): State<Arc<Console>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    Form(form): Form<LoginForm>,
) -> Response {
    let refused = |status: StatusCode, message: &str| {
        (
            status,
            render(LoginPage {
                user: None,
                role: "",
                csrf: "",
                no_users: console.users.is_empty(),
                message: Some(message),
            }),
        )
            .into_response()
    };
    let ip = Some(addr.ip());
    if !console.sessions.may_try(&form.name, ip) {
        return refused(
            StatusCode::TOO_MANY_REQUESTS,
            "too many failed logins: wait five minutes",
        );
    }
    let checking = Arc::clone(&console);
    let name = form.name.clone();
    let found = blocking(move || {
        Ok(checking
            .users
            .login(&name, &form.password)
            .map(|u| (u.name.clone(), u.role)))
    })
    .await;
    match found {
        Ok(Some((name, role))) => {
            console.sessions.succeeded(&name);
            let id = console.sessions.open(&name, role);
            tracing::info!(user = %name, role = role.name(), "console login");
            let secure = if console.secure_cookie {
                "; Secure"
            } else {
                ""
            };
            let cookie = format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict{secure}");
            let mut response = Redirect::to("/").into_response();
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(header::SET_COOKIE, v);
            }
            response
        }
        Ok(None) => {
            console.sessions.failed(&form.name, ip);
            tracing::warn!(user = %form.name, %addr, "console login refused");
            refused(StatusCode::UNAUTHORIZED, "wrong user name or password")
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    pub(super) csrf: String,
}

pub(super) fn check_csrf(viewer: &Viewer, given: &str) -> Result<(), Failure> {
    if viewer.session.csrf_ok(given) {
        Ok(())
    } else {
        Err(Failure::Forbidden(
            "the form's CSRF token is missing or wrong: reload the page and try again".into(),
        ))
    }
}

pub async fn logout(
    State(console): State<Arc<Console>>,
    viewer: Viewer,
    Form(form): Form<CsrfForm>,
) -> Result<Response, Failure> {
    check_csrf(&viewer, &form.csrf)?;
    console.sessions.close(&viewer.session_id);
    let mut response = Redirect::to("/login").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "fraudgate_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    Ok(response)
}

#[derive(Template)]
#[template(path = "overview.html")]
struct OverviewPage<'a> {
    user: Option<&'a str>,
    role: &'a str,
    csrf: &'a str,
    model: String,
    queue_depth: String,
    oldest: Option<String>,
    decisions: Vec<(&'static str, u64)>,
    precision: Vec<(&'static str, i64, i64, String)>,
    drift: Vec<(String, String)>,
    histogram: String,
    per_minute: String,
    latency: String,
}

pub async fn overview(
    State(console): State<Arc<Console>>,
    viewer: Viewer,
) -> Result<Response, Failure> {
    let parts = console.parts()?;
    let (queue_depth, oldest) = match console.depth().await {
        Some((n, oldest)) => (n.to_string(), oldest),
        None => ("no journal".into(), None),
    };
    let status = parts.models.current();
    let precision = [Decision::Review, Decision::Deny, Decision::Allow]
        .into_iter()
        .map(|d| {
            let l = parts.models.labels(d);
            let p = l
                .precision()
                .map_or_else(|| "-".to_owned(), |p| format!("{p:.3}"));
            (d.name(), l.fraud, l.legitimate, p)
        })
        .collect();
    let mut drift: Vec<(String, f64)> = match &status.drift {
        Some(report) => std::iter::once(("score".to_owned(), report.score))
            .chain(
                crate::features::names()
                    .zip(&report.features)
                    .map(|(n, &psi)| (n.to_owned(), psi)),
            )
            .collect(),
        None => Vec::new(),
    };
    drift.sort_by(|a, b| b.1.total_cmp(&a.1));
    drift.truncate(10);
    let s = &viewer.session;
    Ok(render(OverviewPage {
        user: Some(&s.user),
        role: s.role.name(),
        csrf: &s.csrf,
        model: status.model.version.to_string(),
        queue_depth,
        oldest,
        decisions: console.metrics.decision_counts().to_vec(),
        precision,
        drift: drift
            .into_iter()
            .map(|(n, p)| (n, format!("{p:.4}")))
            .collect(),
        histogram: histogram_svg(&console.metrics.score_buckets()),
        per_minute: per_minute_svg(&console.per_minute()),
        latency: ["Score", "ScoreStream"]
            .iter()
            .filter_map(|rpc| {
                let q = console.metrics.latency_quantiles(rpc, &[0.5, 0.99])?;
                Some(format!(
                    "{rpc}: p50 <= {:.0} us, p99 <= {:.0} us",
                    q[0] * 1e6,
                    q[1] * 1e6
                ))
            })
            .collect::<Vec<_>>()
            .join(" · "),
    }))
}

/// Decisions per minute, stacked by outcome (allow, review, deny), the last hour.
fn per_minute_svg(minutes: &[(i64, [u64; 3])]) -> String {
    let max = minutes
        .iter()
        .map(|(_, c)| c.iter().sum::<u64>())
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let (h, step) = (120.0, 12.0);
    let mut svg = format!(
        r#"<svg id="per-minute" width="{}" height="{}" role="img" aria-label="decisions per minute">"#,
        ((minutes.len().max(1) as f64) * step + 60.0).max(260.0),
        h + 20.0
    );
    for (i, (minute, counts)) in minutes.iter().enumerate() {
        let x = i as f64 * step + 4.0;
        let mut y = h;
        for (k, class) in ["allow", "review", "deny"].iter().enumerate() {
            let bh = counts[k] as f64 / max * h;
            y -= bh;
            let _ = write!(
                svg,
                r#"<rect class="{class}" x="{x}" y="{y:.1}" width="{:.1}" height="{bh:.1}"><title>minute {minute}: {} {class}</title></rect>"#,
                step - 2.0,
                counts[k]
            );
        }
    }
    let _ = write!(
        svg,
        r#"<text x="4" y="{}">last {} min, max {} a minute</text></svg>"#,
        h + 16.0,
        minutes.len(),
        max as u64
    );
    svg
}

/// The score histogram as an SVG bar chart (counts per bucket, not cumulative).
fn histogram_svg(buckets: &[(f64, u64)]) -> String {
    let mut counts = Vec::with_capacity(buckets.len());
    let mut before = 0;
    for (upper, cumulative) in buckets {
        counts.push((*upper, cumulative.saturating_sub(before)));
        before = *cumulative;
    }
    let max = counts.iter().map(|c| c.1).max().unwrap_or(0).max(1) as f64;
    let (w, h, bar) = (40.0 * counts.len().max(1) as f64, 160.0, 32.0);
    let mut svg = format!(
        r#"<svg id="score-histogram" width="{w}" height="{}" role="img" aria-label="score histogram">"#,
        h + 30.0
    );
    for (i, (upper, n)) in counts.iter().enumerate() {
        let bh = (*n as f64 / max) * h;
        let x = i as f64 * 40.0 + 4.0;
        let _ = write!(
            svg,
            r#"<rect class="bar" x="{x}" y="{}" width="{bar}" height="{bh}"><title>score up to {upper:.2}: {n}</title></rect><text x="{x}" y="{}">{upper:.2}</text>"#,
            h - bh,
            h + 14.0
        );
    }
    svg.push_str("</svg>");
    svg
}

/// Escapes text for SVG (XML).
fn xml(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The reasons' contributions as horizontal bars.
fn reasons_svg(case: &Case) -> String {
    let max = case
        .reasons
        .iter()
        .map(|r| r.contribution.abs())
        .fold(0.0, f64::max)
        .max(1e-9);
    let rows = case.reasons.len().max(1);
    let mut svg = format!(
        r#"<svg id="reasons-chart" width="720" height="{}" role="img" aria-label="reasons">"#,
        rows * 24 + 8
    );
    for (i, r) in case.reasons.iter().enumerate() {
        let y = i * 24 + 4;
        let width = if r.code == "RULE" || r.contribution == 0.0 {
            4.0
        } else {
            (r.contribution.abs() / max) * 380.0
        };
        let _ = write!(
            svg,
            r#"<text x="4" y="{}">{}</text><rect class="bar" x="240" y="{y}" width="{width:.1}" height="18"></rect><text x="{:.1}" y="{}">{:.4}</text>"#,
            y + 14,
            xml(&r.feature),
            244.0 + width,
            y + 14,
            r.contribution
        );
    }
    svg.push_str("</svg>");
    svg
}

#[derive(Deserialize, Default)]
pub struct QueueQuery {
    #[serde(default)]
    min_score: String,
    #[serde(default)]
    min_amount: String,
    #[serde(default)]
    merchant: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    denied: String,
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
}

/// The filters as the form shows them.
pub struct FilterView {
    min_score: String,
    min_amount: String,
    merchant: String,
    reason: String,
    denied: bool,
    from: String,
    to: String,
}

impl QueueQuery {
    fn filter(&self) -> Result<Filter, Failure> {
        let number = |field: &str, v: &str| -> Result<Option<f64>, Failure> {
            match v.trim() {
                "" => Ok(None),
                v => v
                    .parse()
                    .map(Some)
                    .map_err(|_| Failure::BadRequest(format!("{field}: {v:?} is not a number"))),
            }
        };
        let text = |v: &str| (!v.trim().is_empty()).then(|| v.trim().to_owned());
        Ok(Filter {
            min_score: number("min_score", &self.min_score)?,
            min_amount_minor: number("min_amount", &self.min_amount)?.map(|a| a as i64),
            merchant_id: text(&self.merchant),
            reason: text(&self.reason),
            include_denied: !self.denied.is_empty(),
            from: text(&self.from),
            to: text(&self.to),
        })
    }

    fn view(&self) -> FilterView {
        FilterView {
            min_score: self.min_score.clone(),
            min_amount: self.min_amount.clone(),
            merchant: self.merchant.clone(),
            reason: self.reason.clone(),
            denied: !self.denied.is_empty(),
            from: self.from.clone(),
            to: self.to.clone(),
        }
    }
}

#[derive(Template)]
#[template(path = "queue.html")]
struct QueuePage<'a> {
    user: Option<&'a str>,
    role: &'a str,
    csrf: &'a str,
    unavailable: Option<String>,
    filter: FilterView,
    payments: Vec<Payment>,
}

/// Rows a queue page shows.
const QUEUE_PAGE: usize = 200;

pub async fn queue(
    State(console): State<Arc<Console>>,
    viewer: Viewer,
    Query(query): Query<QueueQuery>,
) -> Result<Response, Failure> {
    let filter = query.filter()?;
    let (payments, unavailable) = match console.cases() {
        Ok(cases) => (
            blocking(move || cases.queue(&filter, QUEUE_PAGE)).await?,
            None,
        ),
        Err(e) => (Vec::new(), Some(e.message().to_owned())),
    };
    let s = &viewer.session;
    Ok(render(QueuePage {
        user: Some(&s.user),
        role: s.role.name(),
        csrf: &s.csrf,
        unavailable,
        filter: query.view(),
        payments,
    }))
}

pub async fn next_case(
    State(console): State<Arc<Console>>,
    viewer: Viewer,
    Form(form): Form<CsrfForm>,
) -> Result<Response, Failure> {
    check_csrf(&viewer, &form.csrf)?;
    viewer.require(Role::Analyst)?;
    let cases = console.cases()?;
    let user = viewer.session.user.clone();
    Ok(match blocking(move || cases.next(&user)).await? {
        Some(id) => Redirect::to(&format!("/cases/{}", path_segment(&id))).into_response(),
        None => Redirect::to("/queue").into_response(),
    })
}

/// `id` as one URL path segment.
pub(super) fn path_segment(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[derive(Template)]
#[template(path = "case.html")]
struct CasePage<'a> {
    user: Option<&'a str>,
    role: &'a str,
    csrf: &'a str,
    c: Case,
    can_decide: bool,
    flash: Option<String>,
    reasons_chart: String,
    neighbours: Vec<(&'static str, Vec<Payment>)>,
}

#[derive(Deserialize, Default)]
pub struct CaseQuery {
    #[serde(default)]
    done: String,
}

async fn load_case(console: &Console, id: String) -> Result<Case, Failure> {
    let cases = console.cases()?;
    let wanted = id.clone();
    blocking(move || cases.case(&wanted))
        .await?
        .ok_or_else(|| Failure::NotFound(format!("no journaled decision for transaction {id}")))
}

pub async fn case(
    State(console): State<Arc<Console>>,
    viewer: Viewer,
    Path(id): Path<String>,
    Query(query): Query<CaseQuery>,
) -> Result<Response, Failure> {
    let mut c = load_case(&console, id).await?;
    let reasons_chart = reasons_svg(&c);
    let neighbours = vec![
        (
            "The account's other payments",
            std::mem::take(&mut c.account_recent),
        ),
        ("Same device", std::mem::take(&mut c.same_device)),
        ("Same IP address", std::mem::take(&mut c.same_ip)),
        ("Same merchant", std::mem::take(&mut c.same_merchant)),
    ];
    let s = &viewer.session;
    let flash = match query.done.as_str() {
        "" => None,
        "note" => Some("Note added.".to_owned()),
        "escalated" => Some("Escalated.".to_owned()),
        label => Some(format!("Verdict recorded: {label}.")),
    };
    Ok(render(CasePage {
        user: Some(&s.user),
        role: s.role.name(),
        csrf: &s.csrf,
        can_decide: s.role >= Role::Analyst,
        flash,
        reasons_chart,
        neighbours,
        c,
    }))
}

#[derive(Deserialize)]
pub struct VerdictForm {
    #[serde(default)]
    csrf: String,
    label: String,
}

/// What a verdict did.
#[derive(serde::Serialize)]
pub struct Verdict {
    pub transaction_id: String,
    pub label: String,
    pub applied: bool,
    pub previous_label: Option<&'static str>,
    pub by: String,
}

/// Gives a verdict the way `ReportFeedback` does (journaled, counters changed at once), with
/// the user's name, then closes the case.
async fn give_verdict(
    console: &Console,
    id: String,
    label: &str,
    user: &str,
) -> Result<Verdict, Failure> {
    let parts = console.parts()?;
    let cases = console.cases()?;
    let wire_label = match label {
        "FRAUD" => proto::Label::Fraud,
        "LEGITIMATE" => proto::Label::Legitimate,
        other => {
            return Err(Failure::BadRequest(format!(
                "label: {other:?} is not FRAUD or LEGITIMATE"
            )))
        }
    };
    let request = proto::ReportFeedbackRequest {
        transaction_id: id.clone(),
        label: wire_label as i32,
        source: proto::FeedbackSource::AnalystReview as i32,
        ..Default::default()
    };
    let fb =
        crate::wire::parse::feedback(&request).map_err(|e| Failure::BadRequest(e.to_string()))?;
    let applied = parts
        .node
        .feedback_by(&fb, request, Some(user.to_owned()))
        .await
        .map_err(|e| match e {
            NodeError::NotFound => Failure::NotFound(format!(
                "transaction {id} is no longer among the recent ones the server keeps: \
                 its verdict cannot change the counters"
            )),
            NodeError::JournalFull => {
                Failure::Unavailable("the journal is behind: try again in a moment".into())
            }
            other => Failure::Internal(other.to_string()),
        })?;
    let (closing, verdict, by) = (id.clone(), label.to_owned(), user.to_owned());
    blocking(move || cases.decided(&closing, &verdict, &by)).await?;
    tracing::info!(transaction = %id, label, user, "verdict given in the console");
    Ok(Verdict {
        transaction_id: id,
        label: label.to_owned(),
        applied: applied.outcome.applied,
        previous_label: applied.outcome.previous.map(|l| l.name()),
        by: user.to_owned(),
    })
}

pub async fn verdict(
    State(console): State<Arc<Console>>,
    viewer: Viewer,
    Path(id): Path<String>,
    Form(form): Form<VerdictForm>,
) -> Result<Response, Failure> {
    check_csrf(&viewer, &form.csrf)?;
    viewer.require(Role::Analyst)?;
    let v = give_verdict(&console, id, &form.label, &viewer.session.user).await?;
    Ok(Redirect::to(&format!(
        "/cases/{}?done={}",
        path_segment(&v.transaction_id),
        v.label
    ))
    .into_response())
}

#[derive(Deserialize)]
pub struct NoteForm {
    #[serde(default)]
    csrf: String,
    text: String,
}

pub async fn note(
    State(console): State<Arc<Console>>,
    viewer: Viewer,
    Path(id): Path<String>,
    Form(form): Form<NoteForm>,
) -> Result<Response, Failure> {
    check_csrf(&viewer, &form.csrf)?;
    viewer.require(Role::Analyst)?;
    let text = form.text.trim().to_owned();
    if text.is_empty() || text.len() > 2_000 {
        return Err(Failure::BadRequest("text: 1 to 2,000 bytes".into()));
    }
    let cases = console.cases()?;
    let (case, user) = (id.clone(), viewer.session.user.clone());
    blocking(move || cases.note(&case, &user, &text)).await?;
    Ok(Redirect::to(&format!("/cases/{}?done=note", path_segment(&id))).into_response())
}

pub async fn escalate(
    State(console): State<Arc<Console>>,
    viewer: Viewer,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Result<Response, Failure> {
    check_csrf(&viewer, &form.csrf)?;
    viewer.require(Role::Analyst)?;
    let cases = console.cases()?;
    let (case, user) = (id.clone(), viewer.session.user.clone());
    blocking(move || cases.escalate(&case, &user)).await?;
    Ok(Redirect::to(&format!("/cases/{}?done=escalated", path_segment(&id))).into_response())
}

#[derive(Template)]
#[template(path = "search.html")]
struct SearchPage<'a> {
    user: Option<&'a str>,
    role: &'a str,
    csrf: &'a str,
    q: String,
    unavailable: Option<String>,
    payments: Vec<Payment>,
}

#[derive(Deserialize, Default)]
pub struct SearchQuery {
    #[serde(default)]
    q: String,
}

pub async fn search(
    State(console): State<Arc<Console>>,
    viewer: Viewer,
    Query(query): Query<SearchQuery>,
) -> Result<Response, Failure> {
    let q = query.q.trim().to_owned();
    let (payments, unavailable) = match (q.is_empty(), console.cases()) {
        (true, _) => (Vec::new(), None),
        (false, Ok(cases)) => {
            let wanted = q.clone();
            let found = blocking(move || {
                let mut found = cases
                    .case(&wanted)?
                    .map(|c| vec![c.payment])
                    .unwrap_or_default();
                found.extend(cases.by_account(&wanted, 100)?);
                Ok(found)
            })
            .await?;
            (found, None)
        }
        (false, Err(e)) => (Vec::new(), Some(e.message().to_owned())),
    };
    let s = &viewer.session;
    Ok(render(SearchPage {
        user: Some(&s.user),
        role: s.role.name(),
        csrf: &s.csrf,
        q,
        unavailable,
        payments,
    }))
}

pub async fn stylesheet() -> impl IntoResponse {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/css"));
    (headers, include_str!("templates/console.css"))
}

pub async fn api_queue(
    State(console): State<Arc<Console>>,
    _user: ApiUser,
    Query(query): Query<QueueQuery>,
) -> Result<Json<Vec<Payment>>, ApiFailure> {
    let filter = query.filter()?;
    let cases = console.cases()?;
    Ok(Json(
        blocking(move || cases.queue(&filter, QUEUE_PAGE)).await?,
    ))
}

pub async fn api_case(
    State(console): State<Arc<Console>>,
    _user: ApiUser,
    Path(id): Path<String>,
) -> Result<Json<Case>, ApiFailure> {
    Ok(Json(load_case(&console, id).await?))
}

#[derive(Deserialize)]
pub struct ApiVerdict {
    label: String,
}

pub async fn api_verdict(
    State(console): State<Arc<Console>>,
    user: ApiUser,
    Path(id): Path<String>,
    Json(body): Json<ApiVerdict>,
) -> Result<Json<Verdict>, ApiFailure> {
    if user.role < Role::Analyst {
        return Err(ApiFailure(Failure::Forbidden(format!(
            "{} may not give verdicts: it needs the analyst role",
            user.name
        ))));
    }
    Ok(Json(
        give_verdict(&console, id, &body.label, &user.name).await?,
    ))
}
