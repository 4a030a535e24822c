//! The console's admin pages: the analysts' rules and lists (edit with the syntax check, the
//! backtest beside the edit, enable, shadow) and the models (registry, promote, roll back).
//! Everything goes through the same transport-free admins as the gRPC services, with the
//! console user's name recorded as the one who changed it.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use askama::Template;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use serde::Deserialize;

use super::pages::{check_csrf, render, CsrfForm};
use super::users::Role;
use super::{Console, Failure, Viewer};
use crate::journal::rule_test::{Backtest, Figures, Report};
use crate::rules::{Action, Entry, Mode};
use crate::rules_admin::{AdminError, RuleSpec};

fn admin_failure(e: AdminError) -> Failure {
    match e {
        AdminError::Invalid(m) => Failure::BadRequest(m),
        AdminError::NotFound(m) => Failure::NotFound(m),
        AdminError::Internal(m) => Failure::Internal(m),
        AdminError::Unavailable(m) => Failure::Unavailable(m),
    }
}

/// A rule as the page lists it.
pub struct RuleRow {
    id: String,
    expression: String,
    action: &'static str,
    mode: &'static str,
    enabled: bool,
    version: u32,
    enforced_hits: u64,
    shadow_hits: u64,
    errors: u64,
    by: String,
}

/// The rule form's fields.
#[derive(Deserialize, Default, Clone)]
pub struct RuleForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    id: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    expression: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    mode: String,
    #[serde(default)]
    enabled: String,
    #[serde(default)]
    op: String,
}

/// What the form shows.
pub struct FormView {
    id: String,
    description: String,
    expression: String,
    action: String,
    mode: String,
    enabled: bool,
}

/// A backtest as the page shows it: one row per expression tested.
pub struct TestView {
    period: String,
    decisions: u64,
    fraud: u64,
    legitimate: u64,
    seconds: String,
    rows: Vec<FigureRow>,
}

fn share(x: Option<f64>) -> String {
    x.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"))
}

/// One tested expression's figures, as the page shows them.
pub struct FigureRow {
    name: &'static str,
    hits: u64,
    fraud: u64,
    legitimate: u64,
    unlabelled: u64,
    precision: String,
    caught: String,
    errors: u64,
    changes: String,
}

fn figures_row(name: &'static str, f: &Figures) -> FigureRow {
    let changes = f
        .changes
        .iter()
        .map(|t| {
            let d = |d: Option<crate::domain::Decision>| d.map_or("?", |d| d.name());
            let amounts: Vec<String> = t.amounts.iter().map(|(c, a)| format!("{a} {c}")).collect();
            format!(
                "{} -> {}: {} ({})",
                d(t.from),
                d(t.to),
                t.count,
                amounts.join(", ")
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    FigureRow {
        name,
        hits: f.hits,
        fraud: f.hits_fraud,
        legitimate: f.hits_legitimate,
        unlabelled: f.hits_unlabelled,
        precision: share(f.precision),
        caught: share(f.fraud_caught),
        errors: f.errors,
        changes,
    }
}

fn test_view(r: &Report) -> TestView {
    let day = |s: i64| {
        chrono::DateTime::from_timestamp(s, 0)
            .map_or_else(|| s.to_string(), |t| t.format("%Y-%m-%d %H:%M").to_string())
    };
    let mut rows = vec![figures_row("candidate", &r.candidate)];
    if let Some(c) = &r.current {
        rows.push(figures_row("current version", c));
    }
    TestView {
        period: format!("{} to {} (event time)", day(r.from), day(r.to)),
        decisions: r.decisions,
        fraud: r.fraud,
        legitimate: r.legitimate,
        seconds: format!("{:.2} s", r.took.as_secs_f64()),
        rows,
    }
}

#[derive(Template)]
#[template(path = "rules.html")]
struct RulesPage<'a> {
    user: Option<&'a str>,
    role: &'a str,
    csrf: &'a str,
    is_admin: bool,
    version: u64,
    rules: Vec<RuleRow>,
    lists: Vec<(String, &'static str, usize)>,
    form: FormView,
    flash: Option<String>,
    error: Option<String>,
    test: Option<TestView>,
}

#[derive(Deserialize, Default)]
pub struct RulesQuery {
    #[serde(default)]
    edit: String,
    #[serde(default)]
    done: String,
}

fn rules_page(
    console: &Console,
    viewer: &Viewer,
    form: FormView,
    flash: Option<String>,
    error: Option<String>,
    test: Option<TestView>,
) -> Result<Response, Failure> {
    let parts = console.parts()?;
    let admin = &parts.rules;
    let (version, rules) = admin.rules();
    let stats = admin.book().stats();
    let count = |id: &str, f: fn(&crate::rules::RuleStats) -> &std::sync::atomic::AtomicU64| {
        stats
            .iter()
            .find(|(i, _)| i == id)
            .map_or(0, |(_, s)| f(s).load(Ordering::Relaxed))
    };
    let rows = rules
        .iter()
        .map(|r| RuleRow {
            id: r.id.clone(),
            expression: r.expression.clone(),
            action: r.action.name(),
            mode: r.mode.name(),
            enabled: r.enabled,
            version: r.version,
            enforced_hits: count(&r.id, |s| &s.enforced_hits),
            shadow_hits: count(&r.id, |s| &s.shadow_hits),
            errors: count(&r.id, |s| &s.errors),
            by: r.updated_by.clone(),
        })
        .collect();
    let lists = admin
        .lists()
        .into_iter()
        .map(|l| (l.name, l.kind.name(), l.entries))
        .collect();
    let s = &viewer.session;
    Ok(render(RulesPage {
        user: Some(&s.user),
        role: s.role.name(),
        csrf: &s.csrf,
        is_admin: s.role >= Role::Admin,
        version,
        rules: rows,
        lists,
        form,
        flash,
        error,
        test,
    }))
}

pub async fn rules(
    State(console): State<Arc<Console>>,
    viewer: Viewer,
    Query(query): Query<RulesQuery>,
) -> Result<Response, Failure> {
    let editing = console
        .parts()?
        .rules
        .rules()
        .1
        .into_iter()
        .find(|r| r.id == query.edit);
    let form = match editing {
        Some(r) => FormView {
            id: r.id,
            description: r.description,
            expression: r.expression,
            action: r.action.name().into(),
            mode: r.mode.name().into(),
            enabled: r.enabled,
        },
        None => FormView {
            id: String::new(),
            description: String::new(),
            expression: String::new(),
            action: "REVIEW".into(),
            mode: "SHADOW".into(),
            enabled: true,
        },
    };
    let flash = (!query.done.is_empty()).then(|| format!("Saved: {}.", query.done));
    rules_page(&console, &viewer, form, flash, None, None)
}

pub async fn put_rule(
    State(console): State<Arc<Console>>,
    viewer: Viewer,
    Form(form): Form<RuleForm>,
) -> Result<Response, Failure> {
    check_csrf(&viewer, &form.csrf)?;
    viewer.require(Role::Admin)?;
    let admin = Arc::clone(&console.parts()?.rules);
    let view = FormView {
        id: form.id.clone(),
        description: form.description.clone(),
        expression: form.expression.clone(),
        action: form.action.clone(),
        mode: form.mode.clone(),
        enabled: !form.enabled.is_empty(),
    };
    let action = Action::from_name(&form.action)
        .ok_or_else(|| Failure::BadRequest(format!("action: {:?}", form.action)))?;
    let mode = Mode::from_name(&form.mode)
        .ok_or_else(|| Failure::BadRequest(format!("mode: {:?}", form.mode)))?;
    if form.op == "test" {
        let existing = admin.rules().1.iter().any(|r| r.id == form.id);
        let test = Backtest {
            expression: form.expression.clone(),
            action,
            rule_id: existing.then(|| form.id.clone()),
            from: None,
            to: None,
        };
        return match admin.test_rule(test).await {
            Ok(report) => rules_page(
                &console,
                &viewer,
                view,
                None,
                None,
                Some(test_view(&report)),
            ),
            Err(e) => rules_page(&console, &viewer, view, None, Some(e.to_string()), None),
        };
    }
    let spec = RuleSpec {
        id: form.id.clone(),
        description: form.description.clone(),
        expression: form.expression.clone(),
        action,
        mode,
        enabled: !form.enabled.is_empty(),
    };
    match admin.put_rule(spec, &viewer.session.user).await {
        Ok((_, rule)) => Ok(Redirect::to(&format!(
            "/rules?done={}%20version%20{}",
            super::pages::path_segment(&rule.id),
            rule.version
        ))
        .into_response()),
        Err(AdminError::Invalid(m)) => rules_page(&console, &viewer, view, None, Some(m), None),
        Err(e) => Err(admin_failure(e)),
    }
}

#[derive(Deserialize)]
pub struct ListForm {
    #[serde(default)]
    csrf: String,
    list: String,
    value: String,
    #[serde(default)]
    comment: String,
    #[serde(default)]
    op: String,
}

pub async fn list_entry(
    State(console): State<Arc<Console>>,
    viewer: Viewer,
    Form(form): Form<ListForm>,
) -> Result<Response, Failure> {
    check_csrf(&viewer, &form.csrf)?;
    viewer.require(Role::Admin)?;
    let parts = console.parts()?;
    let admin = &parts.rules;
    let by = &viewer.session.user;
    let done = if form.op == "remove" {
        admin
            .delete_entries(&form.list, std::slice::from_ref(&form.value), by)
            .await
    } else {
        let entry = Entry {
            expires_at: None,
            comment: form.comment.clone(),
        };
        admin
            .put_entries(&form.list, None, vec![(form.value.clone(), entry)], by)
            .await
    };
    match done {
        Ok((_, size)) => Ok(Redirect::to(&format!(
            "/rules?done={}%20({size}%20entries)",
            super::pages::path_segment(&form.list)
        ))
        .into_response()),
        Err(AdminError::Invalid(m)) | Err(AdminError::NotFound(m)) => rules_page(
            &console,
            &viewer,
            FormView {
                id: String::new(),
                description: String::new(),
                expression: String::new(),
                action: "REVIEW".into(),
                mode: "SHADOW".into(),
                enabled: true,
            },
            None,
            Some(m),
            None,
        ),
        Err(e) => Err(admin_failure(e)),
    }
}

/// A model as the page lists it.
pub struct ModelRow {
    version: String,
    current: bool,
    source: String,
    registered_at: String,
    thresholds: String,
    evaluation: String,
}

#[derive(Template)]
#[template(path = "models.html")]
struct ModelsPage<'a> {
    user: Option<&'a str>,
    role: &'a str,
    csrf: &'a str,
    is_admin: bool,
    models: Vec<ModelRow>,
    flash: Option<String>,
}

#[derive(Deserialize, Default)]
pub struct ModelsQuery {
    #[serde(default)]
    done: String,
}

pub async fn models(
    State(console): State<Arc<Console>>,
    viewer: Viewer,
    Query(query): Query<ModelsQuery>,
) -> Result<Response, Failure> {
    let admin = Arc::clone(&console.parts()?.models);
    let current = admin.current().model.version.to_string();
    let rows = tokio::task::spawn_blocking(move || {
        admin
            .registry()
            .list()
            .iter()
            .map(|e| {
                let thresholds = admin.registry().load(&e.version).map_or_else(
                    |_| "-".to_owned(),
                    |m| {
                        format!(
                            "{:.4} / {:.4}",
                            m.meta.thresholds.review, m.meta.thresholds.deny
                        )
                    },
                );
                ModelRow {
                    current: e.version == current,
                    version: e.version.clone(),
                    source: e.source.clone(),
                    registered_at: e.registered_at.clone(),
                    thresholds,
                    evaluation: e.evaluation.as_ref().map_or_else(String::new, |v| {
                        format!(
                            "AP {:.4} vs {:.4}, AUC {:.4} vs {:.4} on {} rows ({} frauds)",
                            v.challenger.average_precision,
                            v.champion.average_precision,
                            v.challenger.auc_roc,
                            v.champion.auc_roc,
                            v.challenger.rows,
                            v.challenger.frauds
                        )
                    }),
                }
            })
            .collect()
    })
    .await
    .map_err(|e| Failure::Internal(format!("listing the models: {e}")))?;
    let s = &viewer.session;
    Ok(render(ModelsPage {
        user: Some(&s.user),
        role: s.role.name(),
        csrf: &s.csrf,
        is_admin: s.role >= Role::Admin,
        models: rows,
        flash: (!query.done.is_empty()).then(|| format!("Now serving {}.", query.done)),
    }))
}

#[derive(Deserialize)]
pub struct PromoteForm {
    #[serde(default)]
    csrf: String,
    version: String,
}

pub async fn promote(
    State(console): State<Arc<Console>>,
    viewer: Viewer,
    Form(form): Form<PromoteForm>,
) -> Result<Response, Failure> {
    check_csrf(&viewer, &form.csrf)?;
    viewer.require(Role::Admin)?;
    let model = console
        .parts()?
        .models
        .promote(&form.version, &viewer.session.user)
        .await
        .map_err(|e| Failure::BadRequest(e.to_string()))?;
    Ok(Redirect::to(&format!(
        "/models?done={}",
        super::pages::path_segment(&model.version)
    ))
    .into_response())
}

pub async fn rollback(
    State(console): State<Arc<Console>>,
    viewer: Viewer,
    Form(form): Form<CsrfForm>,
) -> Result<Response, Failure> {
    check_csrf(&viewer, &form.csrf)?;
    viewer.require(Role::Admin)?;
    let model = console
        .parts()?
        .models
        .rollback(&viewer.session.user)
        .await
        .map_err(|e| Failure::BadRequest(e.to_string()))?;
    Ok(Redirect::to(&format!(
        "/models?done={}",
        super::pages::path_segment(&model.version)
    ))
    .into_response())
}
