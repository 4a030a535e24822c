//! The analyst console in a real browser (headless Chromium driven through chromedriver,
//! Debian's `chromium` and `chromium-driver`) against the real binary, and its refusals over
//! plain HTTP. The browser test saves a screenshot of each page in
//! `target/tmp/console-screenshots/` (the README's pictures are copies).

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::process::{free_port, ServerProcess};
use common::{explain, feature, req, tx};
use fantoccini::{Client, ClientBuilder, Locator};
use fraudgate::console::users::hash_password;
use fraudgate::proto;
use rusqlite::{Connection, OpenFlags};

const EVIL: &str = "<img src=x onerror=alert(1)>";
const API_TOKEN: &str = "ana-api-token-0123456789";

/// A data directory, a users file (analyst `ana`, viewer `vic`) and a policy that sends every
/// payment to review, so the queue has what the test scores.
fn setup(dir: &Path) -> Vec<String> {
    let users = dir.join("users.toml");
    std::fs::write(
        &users,
        format!(
            "[[user]]\nname = \"ana\"\nrole = \"analyst\"\npassword = \"{}\"\ntoken = \"{API_TOKEN}\"\n\
             [[user]]\nname = \"vic\"\nrole = \"viewer\"\npassword = \"{}\"\n\
             [[user]]\nname = \"ada\"\nrole = \"admin\"\npassword = \"{}\"\n",
            hash_password("ana-password-1").unwrap(),
            hash_password("vic-password-1").unwrap(),
            hash_password("ada-password-1").unwrap()
        ),
    )
    .unwrap();
    let policy = dir.join("policy.toml");
    std::fs::write(&policy, "[thresholds]\nreview = 0.0\ndeny = 1.0\n").unwrap();
    vec![
        "--data-dir".into(),
        dir.join("data").to_str().unwrap().into(),
        "--console-users".into(),
        users.to_str().unwrap().into(),
        "--policy".into(),
        policy.to_str().unwrap().into(),
    ]
}

async fn start(dir: &Path) -> ServerProcess {
    let args = setup(dir);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ServerProcess::start(&args).await
}

/// Headless Chromium through a chromedriver of its own; stopped when dropped.
struct Browser {
    driver: Child,
    client: Client,
    /// Chromium's profile, removed with the browser.
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    /// chromedriver and the Chromium it started share a process group of their own: all of
    /// it goes, even when a test fails half way.
    fn drop(&mut self) {
        // SAFETY: killpg has no memory-safety preconditions; the group is the driver's own.
        unsafe {
            libc::killpg(self.driver.id() as libc::pid_t, libc::SIGKILL);
        }
        let _ = self.driver.wait();
    }
}

async fn browser() -> Browser {
    let port = free_port();
    // Chromium's profile and scratch files, removed with the browser.
    let profile = tempfile::tempdir().unwrap();
    let driver = Command::new("chromedriver")
        .env("TMPDIR", profile.path())
        .arg(format!("--port={port}"))
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run chromedriver ({e}): apt-get install chromium chromium-driver")
        });
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,1100",
                     format!("--user-data-dir={}", profile.path().display())],
        }),
    );
    let mut last = None;
    for _ in 0..100 {
        match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(client) => {
                return Browser {
                    driver,
                    client,
                    _profile: profile,
                }
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("chromedriver never answered: {last:?}");
}

fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(client: &Client, name: &str) {
    let png = client.screenshot().await.unwrap();
    std::fs::write(screenshots().join(format!("console-{name}.png")), png).unwrap();
}

async fn text(client: &Client, css: &str) -> String {
    // Waits for the element: a click that navigates returns before the next page is there.
    client
        .wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_analyst_logs_in_works_the_queue_and_gives_a_verdict_in_the_browser() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let console = format!("http://{}", server.metrics.expect("the HTTP listener"));
    let mut scorer = server.client().await;
    for (i, merchant) in ["m-shop", EVIL, "m-shop"].iter().enumerate() {
        let t = tx(
            &format!("c-{i}"),
            &format!("acct-{i}"),
            merchant,
            4_200 + i as i64,
            i as i64 * 60,
        );
        let r = scorer.score(req(t)).await.unwrap().into_inner();
        assert_eq!(r.decision, proto::Decision::Review as i32);
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // decisions reach the journal

    let b = browser().await;
    let c = &b.client;
    // Logged out: the login page.
    c.goto(&format!("{console}/queue")).await.unwrap();
    assert!(c.current_url().await.unwrap().path().ends_with("/login"));
    screenshot(c, "login").await;
    c.find(Locator::Id("name"))
        .await
        .unwrap()
        .send_keys("ana")
        .await
        .unwrap();
    c.find(Locator::Id("password"))
        .await
        .unwrap()
        .send_keys("ana-password-1")
        .await
        .unwrap();
    c.find(Locator::Id("login"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    // The queue's depth is counted every 5 s in the background.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while text(c, "#queue-depth").await != "3" {
        assert!(
            std::time::Instant::now() < deadline,
            "the overview never counted 3"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.refresh().await.unwrap();
    }
    let latency = text(c, "#latency").await;
    assert!(latency.starts_with("Latency Score: p50 <="), "{latency}");
    screenshot(c, "overview").await;

    c.goto(&format!("{console}/queue")).await.unwrap();
    let queue = text(c, "#queue").await;
    for id in ["c-0", "c-1", "c-2"] {
        assert!(queue.contains(id), "{queue}");
    }
    // The attacker's merchant id is text, not an element, and nothing ran.
    assert!(queue.contains(EVIL), "{queue}");
    assert!(c
        .find_all(Locator::Css("#queue img"))
        .await
        .unwrap()
        .is_empty());
    assert!(c.get_alert_text().await.is_err(), "an alert opened");
    screenshot(c, "queue").await;

    // "Next case" gives the oldest unassigned one.
    c.find(Locator::Id("next-case"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    assert_eq!(text(c, "#case-id").await, "c-0");
    assert_eq!(text(c, "#status").await, "assigned");
    c.goto(&format!("{console}/cases/c-1")).await.unwrap();
    assert_eq!(text(c, "#merchant").await, EVIL);
    assert!(c
        .find_all(Locator::Css("#merchant img"))
        .await
        .unwrap()
        .is_empty());
    screenshot(c, "case").await;

    // Fraud, through the ReportFeedback path: journaled with the user, counted at once.
    c.find(Locator::Id("verdict-fraud"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    assert!(text(c, "#flash").await.contains("FRAUD"));
    assert_eq!(text(c, "#status").await, "closed");
    let journal = Connection::open_with_flags(
        dir.path().join("data/journal.db"),
        OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let (label, source, by): (String, String, String) = journal
        .query_row(
            "SELECT label, source, reported_by FROM feedback WHERE transaction_id = 'c-1'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(
        (label.as_str(), source.as_str(), by.as_str()),
        ("FRAUD", "FEEDBACK_SOURCE_ANALYST_REVIEW", "ana")
    );
    let next = scorer
        .score(explain(tx("c-3", "acct-9", EVIL, 4_300, 600)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(feature(&next, "merch_frauds_30d"), 1.0);

    // A note, then search by account.
    c.goto(&format!("{console}/cases/c-2")).await.unwrap();
    c.find(Locator::Id("note-text"))
        .await
        .unwrap()
        .send_keys("called the cardholder")
        .await
        .unwrap();
    c.find(Locator::Id("add-note"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.wait().for_element(Locator::Id("flash")).await.unwrap();
    let notes = text(c, "#notes").await;
    assert!(notes.contains("ana: called the cardholder"), "{notes:?}");
    c.goto(&format!("{console}/search?q=acct-1")).await.unwrap();
    assert!(text(c, "#results").await.contains("c-1"));
    screenshot(c, "search").await;
    // The queue no longer holds the decided case.
    c.goto(&format!("{console}/queue")).await.unwrap();
    assert!(!text(c, "#queue").await.contains("c-1"));
}

/// A cookie jar of one: the session cookie a login set.
async fn login(http: &reqwest::Client, console: &str, name: &str, password: &str) -> String {
    let r = http
        .post(format!("{console}/login"))
        .form(&[("name", name), ("password", password)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303, "login of {name}");
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    cookie.split(';').next().unwrap().to_owned()
}

async fn csrf_of(http: &reqwest::Client, console: &str, cookie: &str) -> String {
    let page = http
        .get(format!("{console}/queue"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let at = page
        .find("name=\"csrf\" value=\"")
        .expect("a form with a CSRF token")
        + 19;
    page[at..at + 64].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_refuses_strangers_forgeries_viewers_and_guessers() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let console = format!("http://{}", server.metrics.expect("the HTTP listener"));
    let mut scorer = server.client().await;
    scorer
        .score(req(tx("h-1", "acct-1", "m-1", 5_000, 0)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await; // the decision reaches the journal
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    // Not logged in: pages send to the login page, the API answers 401.
    let r = http
        .get(format!("{console}/cases/h-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (
            r.status().as_u16(),
            r.headers()["location"].to_str().unwrap()
        ),
        (303, "/login")
    );
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("default-src 'none'") && !csp.contains("script-src"),
        "{csp}"
    );
    let r = http
        .get(format!("{console}/api/v1/review-queue"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let api = http
        .get(format!("{console}/api/v1/review-queue"))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 200);
    let queue: serde_json::Value = api.json().await.unwrap();
    assert_eq!(queue[0]["transaction_id"], "h-1");
    // The filters: by merchant, by event time.
    for (query, n) in [
        ("merchant=m-1", 1),
        ("merchant=m-2", 0),
        ("from=2025-03-01", 1),
        ("to=2025-03-01", 0),
        ("min_score=x", -1),
    ] {
        let r = http
            .get(format!("{console}/api/v1/review-queue?{query}"))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .unwrap();
        if n < 0 {
            assert_eq!(r.status(), 400, "{query}");
            let body: serde_json::Value = r.json().await.unwrap();
            assert!(
                body["error"].as_str().unwrap().starts_with("min_score:"),
                "{body}"
            );
            continue;
        }
        let rows: Vec<serde_json::Value> = r.json().await.unwrap();
        assert_eq!(rows.len(), n as usize, "{query}");
    }

    // A POST without its CSRF token (or with another session's) changes nothing.
    let ana = login(&http, &console, "ana", "ana-password-1").await;
    let vic = login(&http, &console, "vic", "vic-password-1").await;
    let vic_csrf = csrf_of(&http, &console, &vic).await;
    for form in [
        vec![("label", "FRAUD")],
        vec![("label", "FRAUD"), ("csrf", vic_csrf.as_str())],
    ] {
        let r = http
            .post(format!("{console}/cases/h-1/verdict"))
            .header("cookie", &ana)
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
    }
    // A viewer cannot give a verdict, in the browser's way or through the API.
    let r = http
        .post(format!("{console}/cases/h-1/verdict"))
        .header("cookie", &vic)
        .form(&[("label", "FRAUD"), ("csrf", vic_csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("needs the analyst role"));
    let journal = Connection::open_with_flags(
        dir.path().join("data/journal.db"),
        OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let labels: i64 = journal
        .query_row("SELECT COUNT(*) FROM feedback", [], |r| r.get(0))
        .unwrap();
    assert_eq!(labels, 0);
    // The API's analyst can.
    let r = http
        .post(format!("{console}/api/v1/cases/h-1/verdict"))
        .bearer_auth(API_TOKEN)
        .json(&serde_json::json!({"label": "LEGITIMATE"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        (v["applied"].as_bool(), v["by"].as_str()),
        (Some(true), Some("ana"))
    );

    // Guessing passwords: five wrong tries, then refused even with the right one.
    for _ in 0..5 {
        let r = http
            .post(format!("{console}/login"))
            .form(&[("name", "vic"), ("password", "wrong")])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    let r = http
        .post(format!("{console}/login"))
        .form(&[("name", "vic"), ("password", "vic-password-1")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
}

async fn log_in(c: &Client, console: &str, name: &str, password: &str) {
    c.goto(&format!("{console}/login")).await.unwrap();
    c.find(Locator::Id("name"))
        .await
        .unwrap()
        .send_keys(name)
        .await
        .unwrap();
    c.find(Locator::Id("password"))
        .await
        .unwrap()
        .send_keys(password)
        .await
        .unwrap();
    c.find(Locator::Id("login"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.wait()
        .for_element(Locator::Id("queue-depth"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_writes_a_rule_with_its_backtest_and_sees_the_models() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let console = format!("http://{}", server.metrics.expect("the HTTP listener"));
    let mut scorer = server.client().await;
    for i in 0..20i64 {
        let t = tx(
            &format!("r-{i}"),
            &format!("acct-{}", i % 4),
            "m-1",
            1_000 + i * 500,
            i * 60,
        );
        scorer.score(req(t)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b = browser().await;
    let c = &b.client;
    log_in(c, &console, "ada", "ada-password-1").await;
    c.goto(&format!("{console}/rules")).await.unwrap();
    let fill = |id: &'static str, value: &'static str| async move {
        let field = c.find(Locator::Id(id)).await.unwrap();
        field.clear().await.unwrap();
        field.send_keys(value).await.unwrap();
    };
    fill("rule-id", "big").await;
    fill("rule-description", "over 60 EUR").await;
    // A mistake is refused where it is, and the form keeps what was typed.
    fill("rule-expression", "tx.amount > 60.0 && features.nope > 1.0").await;
    c.find(Locator::Id("rule-save"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let error = text(c, "#rule-error").await;
    assert!(
        error.contains("unknown feature 'nope'") && error.contains("column"),
        "{error}"
    );
    fill("rule-expression", "tx.amount > 60.0").await;
    c.find(Locator::Id("rule-test"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let backtest = text(c, "#backtest").await;
    assert!(backtest.starts_with("20 decisions"), "{backtest}");
    // Amounts 10.00 + 5.00 i EUR: above 60 for i = 11..19.
    assert_eq!(text(c, "#hits-1").await, "9");
    screenshot(c, "rules").await;
    c.find(Locator::Id("rule-save"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    assert!(text(c, "#flash").await.contains("big version 1"));
    assert!(text(c, "#rules").await.contains("tx.amount > 60.0"));
    // In force: the next payment above 60 EUR is reviewed by the rule (shadow by default).
    let r = scorer
        .score(req(tx("r-x", "acct-1", "m-1", 9_000, 3_600)))
        .await
        .unwrap()
        .into_inner();
    assert!(
        r.reasons.iter().all(|r| r.code != "RULE"),
        "shadow: {:?}",
        r.reasons
    );
    let listed = text(c, "#rules").await;
    assert!(listed.contains("SHADOW"), "{listed}");

    c.goto(&format!("{console}/models")).await.unwrap();
    assert!(text(c, "#models").await.contains("serving"));
    screenshot(c, "models").await;
}

/// The case API finds a payment by its id and its neighbours by account, device, IP and
/// merchant (through the journal's lookup index, not SQLite indexes); a server restarted
/// after a crash that lost that index rebuilds it from the journal and finds them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_case_finds_its_neighbours_and_again_after_its_lookup_index_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path()).await;
    let mut scorer = server.client().await;
    let with = |id: &str, account: &str, merchant: &str, device: &str, ip: &str, secs| {
        let mut t = tx(id, account, merchant, 2_500, secs);
        t.device_id = device.into();
        t.ip_address = ip.into();
        req(t)
    };
    let payments = [
        with("n-1", "acct-a", "m-a", "dev-a", "10.0.0.1", 0),
        with("n-2", "acct-a", "m-b", "dev-b", "10.0.0.2", 60),
        with("n-3", "acct-b", "m-a", "dev-a", "10.0.0.3", 120),
        with("n-4", "acct-c", "m-c", "dev-c", "10.0.0.1", 180),
        // An account whose id the other begins with: never its neighbour.
        with("n-5", "acct-aa", "m-aa", "dev-aa", "10.0.0.11", 240),
        with("n-6", "acct-a", "m-a", "dev-a", "10.0.0.1", 300),
    ];
    for p in payments {
        scorer.score(p).await.unwrap();
    }
    let http = reqwest::Client::new();
    let case = |console: String| {
        let http = http.clone();
        async move {
            let r = http
                .get(format!("{console}/api/v1/cases/n-6"))
                .bearer_auth(API_TOKEN)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let c: serde_json::Value = r.json().await.unwrap();
            let ids = |list: &str| -> Vec<String> {
                c[list]
                    .as_array()
                    .unwrap_or_else(|| panic!("{list} in {c}"))
                    .iter()
                    .map(|p| p["transaction_id"].as_str().unwrap().to_owned())
                    .collect()
            };
            (
                c["payment"]["transaction_id"].as_str().unwrap().to_owned(),
                [
                    ids("account_recent"),
                    ids("same_device"),
                    ids("same_ip"),
                    ids("same_merchant"),
                ],
            )
        }
    };
    let want = (
        "n-6".to_owned(),
        [
            vec!["n-2".to_owned(), "n-1".to_owned()],
            vec!["n-3".to_owned(), "n-1".to_owned()],
            vec!["n-4".to_owned(), "n-1".to_owned()],
            vec!["n-3".to_owned(), "n-1".to_owned()],
        ],
    );
    // Async decisions reach the journal within milliseconds; wait for the last one.
    let console = format!("http://{}", server.metrics.expect("the HTTP listener"));
    let mut got = None;
    for _ in 0..100 {
        let r = http
            .get(format!("{console}/api/v1/cases/n-6"))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            got = Some(case(console.clone()).await);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(got.as_ref(), Some(&want));
    let missing = http
        .get(format!("{console}/api/v1/cases/n-"))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404, "a prefix of an id is not the id");

    // Stopped cleanly, then the index lost: the next start indexes the journal again.
    drop(scorer);
    server.signal("-TERM");
    let (status, log) = server.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{log}");
    std::fs::remove_dir_all(dir.path().join("data/journal-lookup")).unwrap();
    let server = start(dir.path()).await;
    let console = format!("http://{}", server.metrics.expect("the HTTP listener"));
    assert_eq!(case(console).await, want);
}
