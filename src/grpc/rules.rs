//! `fraudgate.v1.RulesAdmin`: a thin door over [`crate::rules_admin::RulesAdmin`]. Converts
//! and checks the wire types (errors name the field), and nothing else.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use prost_types::Timestamp;
use tonic::{Request, Response, Status};

use super::auth::Caller;
use crate::domain::Decision;
use crate::journal::rule_test::{Backtest, Figures, Report};
use crate::proto::{self, rules_admin_server};
use crate::rules::{Action, Entry, ListKind, Mode, Rule};
use crate::rules_admin::{AdminError, ListSummary, RuleSpec, RulesAdmin};

/// Largest page of `GetList`.
const MAX_PAGE: usize = 10_000;
/// Most entries in one `PutListEntries` or `DeleteListEntries`.
const MAX_ENTRIES_PER_CALL: usize = 100_000;

/// The service; the admin is set once the node has started (UNAVAILABLE until then).
#[derive(Debug, Clone)]
pub struct RulesService {
    admin: Arc<OnceLock<Arc<RulesAdmin>>>,
}

impl RulesService {
    pub fn new(admin: Arc<OnceLock<Arc<RulesAdmin>>>) -> RulesService {
        RulesService { admin }
    }

    fn admin(&self) -> Result<&Arc<RulesAdmin>, Status> {
        self.admin
            .get()
            .ok_or_else(|| Status::unavailable("fraudgate is starting"))
    }
}

fn status(e: AdminError) -> Status {
    match e {
        AdminError::Invalid(m) => Status::invalid_argument(m),
        AdminError::NotFound(m) => Status::not_found(m),
        AdminError::Internal(m) => Status::internal(m),
        AdminError::Unavailable(m) => Status::failed_precondition(m),
    }
}

fn action_of(field: &str, d: i32) -> Result<Action, Status> {
    match proto::Decision::try_from(d) {
        Ok(proto::Decision::Allow) => Ok(Action::Allow),
        Ok(proto::Decision::Review) => Ok(Action::Review),
        Ok(proto::Decision::Deny) => Ok(Action::Deny),
        _ => Err(Status::invalid_argument(format!(
            "{field}: required, one of DECISION_ALLOW, DECISION_REVIEW, DECISION_DENY"
        ))),
    }
}

fn decision_of(a: Action) -> proto::Decision {
    match a {
        Action::Allow => proto::Decision::Allow,
        Action::Review => proto::Decision::Review,
        Action::Deny => proto::Decision::Deny,
    }
}

fn ts(ms: i64) -> Timestamp {
    Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

fn seconds_of(t: &Timestamp) -> i64 {
    t.seconds
}

fn kind_of(k: i32) -> Result<Option<ListKind>, Status> {
    match proto::ListKind::try_from(k) {
        Ok(proto::ListKind::Unspecified) => Ok(None),
        Ok(proto::ListKind::String) => Ok(Some(ListKind::String)),
        Ok(proto::ListKind::Ip) => Ok(Some(ListKind::Ip)),
        Ok(proto::ListKind::Prefix) => Ok(Some(ListKind::Prefix)),
        Err(_) => Err(Status::invalid_argument(format!(
            "kind: {k} is not a ListKind value"
        ))),
    }
}

fn kind_to(k: ListKind) -> proto::ListKind {
    match k {
        ListKind::String => proto::ListKind::String,
        ListKind::Ip => proto::ListKind::Ip,
        ListKind::Prefix => proto::ListKind::Prefix,
    }
}

fn rule_to(admin: &RulesAdmin, r: &Rule) -> proto::Rule {
    let stats = admin
        .book()
        .stats()
        .into_iter()
        .find(|(id, _)| *id == r.id)
        .map(|(_, s)| s);
    let count = |f: fn(&crate::rules::RuleStats) -> &std::sync::atomic::AtomicU64| {
        stats.as_ref().map_or(0, |s| f(s).load(Ordering::Relaxed))
    };
    proto::Rule {
        id: r.id.clone(),
        description: r.description.clone(),
        expression: r.expression.clone(),
        action: decision_of(r.action) as i32,
        mode: match r.mode {
            Mode::Enforce => proto::RuleMode::Enforce,
            Mode::Shadow => proto::RuleMode::Shadow,
        } as i32,
        enabled: Some(r.enabled),
        version: r.version,
        updated_at: Some(ts(r.updated_at_ms)),
        updated_by: r.updated_by.clone(),
        enforced_hits: count(|s| &s.enforced_hits),
        shadow_hits: count(|s| &s.shadow_hits),
        errors: count(|s| &s.errors),
    }
}

fn summary_to(s: &ListSummary) -> proto::ListSummary {
    proto::ListSummary {
        name: s.name.clone(),
        kind: kind_to(s.kind) as i32,
        entries: s.entries as u64,
    }
}

fn figures_to(f: &Figures) -> proto::BacktestFigures {
    let d = |d: Option<Decision>| d.map_or(proto::Decision::Unspecified, proto::Decision::from);
    proto::BacktestFigures {
        hits: f.hits,
        hits_fraud: f.hits_fraud,
        hits_legitimate: f.hits_legitimate,
        hits_unlabelled: f.hits_unlabelled,
        precision: f.precision,
        fraud_caught: f.fraud_caught,
        errors: f.errors,
        changes: f
            .changes
            .iter()
            .map(|t| proto::DecisionChange {
                from: d(t.from) as i32,
                to: d(t.to) as i32,
                count: t.count,
                amounts: t
                    .amounts
                    .iter()
                    .map(|(c, a)| proto::CurrencyAmount {
                        currency: c.clone(),
                        amount_minor: *a,
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn report_to(r: &Report) -> proto::TestRuleResponse {
    proto::TestRuleResponse {
        from: Some(ts(r.from * 1000)),
        to: Some(ts(r.to * 1000)),
        decisions: r.decisions,
        fraud: r.fraud,
        legitimate: r.legitimate,
        candidate: Some(figures_to(&r.candidate)),
        current: r.current.as_ref().map(figures_to),
        seconds: r.took.as_secs_f64(),
    }
}

#[tonic::async_trait]
impl rules_admin_server::RulesAdmin for RulesService {
    async fn list_rules(
        &self,
        _: Request<proto::ListRulesRequest>,
    ) -> Result<Response<proto::ListRulesResponse>, Status> {
        let admin = self.admin()?;
        let (version, rules) = admin.rules();
        Ok(Response::new(proto::ListRulesResponse {
            rules: rules.iter().map(|r| rule_to(admin, r)).collect(),
            rules_version: version,
        }))
    }

    async fn put_rule(
        &self,
        request: Request<proto::PutRuleRequest>,
    ) -> Result<Response<proto::PutRuleResponse>, Status> {
        let admin = self.admin()?;
        let by = Caller::name_of(&request);
        let rule = request
            .into_inner()
            .rule
            .ok_or_else(|| Status::invalid_argument("rule: required"))?;
        let mode = match proto::RuleMode::try_from(rule.mode) {
            Ok(proto::RuleMode::Enforce) => Mode::Enforce,
            Ok(proto::RuleMode::Shadow) => Mode::Shadow,
            _ => {
                return Err(Status::invalid_argument(
                    "rule.mode: required, RULE_MODE_ENFORCE or RULE_MODE_SHADOW",
                ))
            }
        };
        let spec = RuleSpec {
            id: rule.id,
            description: rule.description,
            expression: rule.expression,
            action: action_of("rule.action", rule.action)?,
            mode,
            enabled: rule.enabled.unwrap_or(true),
        };
        let (version, stored) = admin.put_rule(spec, &by).await.map_err(status)?;
        Ok(Response::new(proto::PutRuleResponse {
            rule: Some(rule_to(admin, &stored)),
            rules_version: version,
        }))
    }

    async fn delete_rule(
        &self,
        request: Request<proto::DeleteRuleRequest>,
    ) -> Result<Response<proto::DeleteRuleResponse>, Status> {
        let admin = self.admin()?;
        let by = Caller::name_of(&request);
        let id = request.into_inner().id;
        let version = admin.delete_rule(&id, &by).await.map_err(status)?;
        Ok(Response::new(proto::DeleteRuleResponse {
            rules_version: version,
        }))
    }

    async fn test_rule(
        &self,
        request: Request<proto::TestRuleRequest>,
    ) -> Result<Response<proto::TestRuleResponse>, Status> {
        let admin = self.admin()?;
        let req = request.into_inner();
        let test = Backtest {
            expression: req.expression,
            action: action_of("action", req.action)?,
            rule_id: (!req.rule_id.is_empty()).then_some(req.rule_id),
            from: req.from.as_ref().map(seconds_of),
            to: req.to.as_ref().map(seconds_of),
        };
        if let (Some(from), Some(to)) = (test.from, test.to) {
            if from >= to {
                return Err(Status::invalid_argument("from: must be before to"));
            }
        }
        let report = admin.test_rule(test).await.map_err(status)?;
        Ok(Response::new(report_to(&report)))
    }

    async fn list_lists(
        &self,
        _: Request<proto::ListListsRequest>,
    ) -> Result<Response<proto::ListListsResponse>, Status> {
        let admin = self.admin()?;
        Ok(Response::new(proto::ListListsResponse {
            lists: admin.lists().iter().map(summary_to).collect(),
        }))
    }

    async fn put_list_entries(
        &self,
        request: Request<proto::PutListEntriesRequest>,
    ) -> Result<Response<proto::ListChangeResponse>, Status> {
        let admin = self.admin()?;
        let by = Caller::name_of(&request);
        let req = request.into_inner();
        if req.entries.len() > MAX_ENTRIES_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "entries: {} in one call, above the limit of {MAX_ENTRIES_PER_CALL}",
                req.entries.len()
            )));
        }
        let kind = kind_of(req.kind)?;
        let entries = req
            .entries
            .into_iter()
            .map(|e| {
                (
                    e.value,
                    Entry {
                        expires_at: e.expires_at.as_ref().map(seconds_of),
                        comment: e.comment,
                    },
                )
            })
            .collect();
        let (version, size) = admin
            .put_entries(&req.list, kind, entries, &by)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::ListChangeResponse {
            rules_version: version,
            entries: size as u64,
        }))
    }

    async fn delete_list_entries(
        &self,
        request: Request<proto::DeleteListEntriesRequest>,
    ) -> Result<Response<proto::ListChangeResponse>, Status> {
        let admin = self.admin()?;
        let by = Caller::name_of(&request);
        let req = request.into_inner();
        if req.values.len() > MAX_ENTRIES_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "values: {} in one call, above the limit of {MAX_ENTRIES_PER_CALL}",
                req.values.len()
            )));
        }
        let (version, size) = admin
            .delete_entries(&req.list, &req.values, &by)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::ListChangeResponse {
            rules_version: version,
            entries: size as u64,
        }))
    }

    async fn get_list(
        &self,
        request: Request<proto::GetListRequest>,
    ) -> Result<Response<proto::GetListResponse>, Status> {
        let admin = self.admin()?;
        let req = request.into_inner();
        let size = match req.page_size as usize {
            0 => 1_000,
            n if n > MAX_PAGE => {
                return Err(Status::invalid_argument(format!(
                    "page_size: {n} is above the limit of {MAX_PAGE}"
                )))
            }
            n => n,
        };
        let page = admin
            .list(&req.list, &req.page_token, size + 1)
            .map_err(status)?;
        let more = page.entries.len() > size;
        let entries: Vec<proto::ListEntry> = page
            .entries
            .into_iter()
            .take(size)
            .map(|(value, e)| proto::ListEntry {
                value,
                expires_at: e.expires_at.map(|s| Timestamp {
                    seconds: s,
                    nanos: 0,
                }),
                comment: e.comment,
            })
            .collect();
        let next = if more {
            entries.last().map(|e| e.value.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(proto::GetListResponse {
            list: Some(summary_to(&page.summary)),
            entries,
            next_page_token: next,
        }))
    }

    async fn list_rule_changes(
        &self,
        request: Request<proto::ListRuleChangesRequest>,
    ) -> Result<Response<proto::ListRuleChangesResponse>, Status> {
        let admin = Arc::clone(self.admin()?);
        let limit = match request.into_inner().limit as usize {
            0 => 100,
            n => n.min(10_000),
        };
        let changes = admin.changes(limit).await.map_err(status)?;
        Ok(Response::new(proto::ListRuleChangesResponse {
            changes: changes
                .into_iter()
                .map(|c| proto::RuleChange {
                    rules_version: c.version,
                    at: Some(ts(c.at_ms)),
                    by: c.by,
                    kind: c.kind,
                    target: c.target,
                    previous: c.previous.unwrap_or_default(),
                })
                .collect(),
        }))
    }
}
