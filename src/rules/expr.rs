//! Rule expressions: CEL, parsed by the `cel` crate, then checked and compiled here into a
//! typed tree that evaluates without allocating.
//!
//! Why not the crate's interpreter: it checks nothing before evaluation (an unknown name or
//! `tx.amount > "x"` fails only when a payment reaches it) and, with its lazy variable
//! resolver, 20 typical rules cost 4.7 us per payment against a budget of 2 us; compiled
//! here they cost 0.43 us (`cargo bench --bench rules`, BENCHMARKS.md). The parser is the crate's, so the syntax is CEL's; this module accepts
//! the part of the language a payment rule needs (literals, the variables below, `! && || ?:`,
//! arithmetic, comparisons, `in` a list literal, `size`, `startsWith`, `endsWith`, `contains`,
//! `matches`, `int`, `double`, `in_list`) and refuses the rest by name when the rule is
//! stored. Types follow CEL: arithmetic never mixes `int`, `uint` and `double`
//! (`features.acct_count_1h > 5` is fine, a comparison; `tx.amount * 2` is refused, write
//! `2.0`), and `&&`/`||` absorb an error on one side when the other decides the result.
//!
//! The variables: `tx.*` (see [`TX_FIELDS`]), `features.<name>` for every name in
//! [`FEATURES`], `score`, `anomaly_score`, `classifier_score`; the function
//! `in_list("name", value)` asks a list (see `super::lists`) as of the payment's event time.

use cel::common::ast::{operators, CallExpr, Expr, IdedExpr, LiteralValue, SourceInfo};

use crate::features::{FeatureVector, FEATURES};

use super::lists::Lists;

/// Longest expression accepted, in bytes.
pub const MAX_EXPRESSION_BYTES: usize = 4 * 1024;
/// Deepest nesting the parser accepts.
const MAX_DEPTH: u16 = 64;

/// The fields of `tx` a rule can name, and their types.
pub const TX_FIELDS: [(&str, Type); 14] = [
    ("transaction_id", Type::String),
    ("account_id", Type::String),
    ("merchant_id", Type::String),
    ("amount", Type::Double),
    ("amount_minor", Type::Int),
    ("currency", Type::String),
    ("country", Type::String),
    ("channel", Type::String),
    ("merchant_category_code", Type::String),
    ("device_id", Type::String),
    ("ip_address", Type::String),
    ("hour", Type::Int),
    ("event_time", Type::Int),
    ("weekday", Type::Int),
];

/// A CEL type this module handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Bool,
    Int,
    Uint,
    Double,
    String,
}

impl Type {
    fn name(self) -> &'static str {
        match self {
            Type::Bool => "bool",
            Type::Int => "int",
            Type::Uint => "uint",
            Type::Double => "double",
            Type::String => "string",
        }
    }

    fn numeric(self) -> bool {
        matches!(self, Type::Int | Type::Uint | Type::Double)
    }
}

/// What a rule sees of one payment. Built per call from the transaction (or, in a backtest,
/// from a journal row); borrows everything.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub transaction_id: &'a str,
    pub account_id: &'a str,
    pub merchant_id: &'a str,
    pub amount: f64,
    pub amount_minor: i64,
    pub currency: &'a str,
    /// `""` when not given (likewise below).
    pub country: &'a str,
    /// The proto's enum name, e.g. `CHANNEL_ECOMMERCE`.
    pub channel: &'a str,
    pub merchant_category_code: &'a str,
    pub device_id: &'a str,
    pub ip_address: &'a str,
    /// Seconds since the epoch, in event time.
    pub event_time: i64,
    pub features: &'a FeatureVector,
    pub score: f64,
    pub anomaly_score: f64,
    pub classifier_score: f64,
}

/// A value during evaluation; strings borrow from the input or the expression.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Value<'a> {
    Bool(bool),
    Int(i64),
    Uint(u64),
    Double(f64),
    Str(&'a str),
}

/// Why an expression could not be evaluated for one payment (the rule is skipped for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    #[error("integer overflow")]
    Overflow,
    #[error("division by zero")]
    DivisionByZero,
    #[error("a double that is not a whole number in range converted to int")]
    Conversion,
}

/// Why an expression was refused when stored: the message names the place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CompileError {
    pub message: String,
}

#[derive(Debug, Clone, Copy)]
enum Var {
    Str(for<'a> fn(&Input<'a>) -> &'a str),
    Amount,
    AmountMinor,
    Hour,
    EventTime,
    Weekday,
    Feature(usize),
    Score,
    Anomaly,
    Classifier,
}

#[derive(Debug, Clone, Copy)]
enum Arith {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

#[derive(Debug, Clone, Copy)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, Copy)]
enum StrTest {
    StartsWith,
    EndsWith,
    Contains,
}

/// A checked, compiled expression node.
#[derive(Debug)]
enum Node {
    Lit(Lit),
    Var(Var),
    Not(Box<Node>),
    Neg(Box<Node>),
    And(Box<(Node, Node)>),
    Or(Box<(Node, Node)>),
    Cond(Box<(Node, Node, Node)>),
    Arith(Arith, Box<(Node, Node)>),
    Cmp(Cmp, Box<(Node, Node)>),
    In(Box<Node>, Box<[Lit]>),
    Str(StrTest, Box<(Node, Node)>),
    Matches(Box<Node>, Box<regex::Regex>),
    Size(Box<Node>),
    ToInt(Box<Node>),
    ToDouble(Box<Node>),
    InList(usize, Box<Node>),
}

#[derive(Debug, Clone)]
enum Lit {
    Bool(bool),
    Int(i64),
    Uint(u64),
    Double(f64),
    Str(Box<str>),
}

impl Lit {
    fn value(&self) -> Value<'_> {
        match self {
            Lit::Bool(b) => Value::Bool(*b),
            Lit::Int(i) => Value::Int(*i),
            Lit::Uint(u) => Value::Uint(*u),
            Lit::Double(d) => Value::Double(*d),
            Lit::Str(s) => Value::Str(s),
        }
    }

    fn ty(&self) -> Type {
        match self {
            Lit::Bool(_) => Type::Bool,
            Lit::Int(_) => Type::Int,
            Lit::Uint(_) => Type::Uint,
            Lit::Double(_) => Type::Double,
            Lit::Str(_) => Type::String,
        }
    }
}

/// A rule's expression, checked and compiled: evaluates to a bool.
#[derive(Debug)]
pub struct Compiled {
    root: Node,
}

impl Compiled {
    /// Parses and checks `source` against the variables and the lists that exist now.
    pub fn new(source: &str, lists: &Lists) -> Result<Compiled, CompileError> {
        if source.len() > MAX_EXPRESSION_BYTES {
            return Err(CompileError {
                message: format!(
                    "is {} bytes, above the limit of {MAX_EXPRESSION_BYTES}",
                    source.len()
                ),
            });
        }
        if source.trim().is_empty() {
            return Err(CompileError {
                message: "is empty".into(),
            });
        }
        let (expr, info) = cel::parser::Parser::new()
            .max_recursion_depth(MAX_DEPTH)
            .parse_with_source_info(source)
            .map_err(|errors| CompileError {
                message: match errors.errors.first() {
                    Some(e) => format!(
                        "syntax error at line {}, column {}: {}",
                        e.pos.0, e.pos.1, e.msg
                    ),
                    None => "syntax error".into(),
                },
            })?;
        let mut checker = Checker { info: &info, lists };
        let (root, ty) = checker.compile(&expr)?;
        if ty != Type::Bool {
            return Err(CompileError {
                message: format!(
                    "must be a bool (true means the rule hits); this one is {}",
                    ty.name()
                ),
            });
        }
        Ok(Compiled { root })
    }

    /// Whether the rule hits this payment.
    pub fn eval(&self, input: &Input<'_>, lists: &Lists) -> Result<bool, Fault> {
        match eval(&self.root, input, lists)? {
            Value::Bool(b) => Ok(b),
            // The checker proved the root is a bool.
            _ => Ok(false),
        }
    }
}

/// A compiled node and its type.
type Typed = (Node, Type);

struct Checker<'a> {
    info: &'a SourceInfo,
    lists: &'a Lists,
}

impl Checker<'_> {
    fn error(&self, at: &IdedExpr, message: impl std::fmt::Display) -> CompileError {
        let place = match self.info.offset_for(at.id) {
            Some((start, _)) => {
                // A byte offset at a token's start: a character boundary (`get` makes sure).
                let source = &self.info.source;
                let before = source
                    .get(..(start as usize).min(source.len()))
                    .unwrap_or(source);
                let line = before.matches('\n').count() + 1;
                let column = before.chars().rev().take_while(|&c| c != '\n').count() + 1;
                format!("at line {line}, column {column}: ")
            }
            None => String::new(),
        };
        CompileError {
            message: format!("{place}{message}"),
        }
    }

    fn compile(&mut self, e: &IdedExpr) -> Result<(Node, Type), CompileError> {
        match &e.expr {
            Expr::Literal(lit) => {
                let lit = self.literal(e, lit)?;
                let ty = lit.ty();
                Ok((Node::Lit(lit), ty))
            }
            Expr::Ident(name) => match name.as_str() {
                "score" => Ok((Node::Var(Var::Score), Type::Double)),
                "anomaly_score" => Ok((Node::Var(Var::Anomaly), Type::Double)),
                "classifier_score" => Ok((Node::Var(Var::Classifier), Type::Double)),
                "tx" | "features" => Err(self.error(
                    e,
                    format!(
                        "{name} is a message: name one of its fields, e.g. {name}.{}",
                        {
                            if name == "tx" {
                                "amount"
                            } else {
                                FEATURES[0].name
                            }
                        }
                    ),
                )),
                other => Err(self.error(
                    e,
                    format!(
                        "unknown variable '{other}' (known: tx.<field>, features.<name>, score, \
                         anomaly_score, classifier_score)"
                    ),
                )),
            },
            Expr::Select(select) => {
                if select.test {
                    return Err(self.error(e, "has() is not supported: every field is present"));
                }
                let Expr::Ident(root) = &select.operand.expr else {
                    return Err(
                        self.error(e, "only tx.<field> and features.<name> can be selected")
                    );
                };
                let field = select.field.as_str();
                // The parser places a selection at its dot: name the place where it starts.
                let e: &IdedExpr = &select.operand;
                match root.as_str() {
                    "tx" => self.tx_field(e, field),
                    "features" => match FEATURES.iter().position(|f| f.name == field) {
                        Some(i) => Ok((Node::Var(Var::Feature(i)), Type::Double)),
                        None => Err(self.error(
                            e,
                            format!(
                                "unknown feature '{field}' (the names are those of FEATURES, \
                                 e.g. {})",
                                FEATURES[0].name
                            ),
                        )),
                    },
                    other => Err(self.error(e, format!("unknown variable '{other}'"))),
                }
            }
            Expr::Call(call) => self.call(e, call),
            Expr::List(_) => Err(self.error(e, "a list literal can only follow 'in'")),
            Expr::Map(_) => Err(self.error(e, "maps are not supported in rules")),
            Expr::Struct(_) => Err(self.error(e, "messages are not supported in rules")),
            Expr::Comprehension(_) => Err(self.error(
                e,
                "macros (all, exists, map, filter) are not supported in rules",
            )),
            Expr::Unspecified => Err(self.error(e, "incomplete expression")),
        }
    }

    fn literal(&self, e: &IdedExpr, lit: &LiteralValue) -> Result<Lit, CompileError> {
        Ok(match lit {
            LiteralValue::Boolean(b) => Lit::Bool(bool::from(*b)),
            LiteralValue::Int(i) => Lit::Int(i64::from(*i)),
            LiteralValue::UInt(u) => Lit::Uint(u64::from(*u)),
            LiteralValue::Double(d) => Lit::Double(f64::from(*d)),
            LiteralValue::String(s) => Lit::Str(std::string::String::from(s.clone()).into()),
            LiteralValue::Null => return Err(self.error(e, "null is not supported in rules")),
            LiteralValue::Bytes(_) => return Err(self.error(e, "bytes are not supported in rules")),
        })
    }

    fn tx_field(&self, e: &IdedExpr, field: &str) -> Result<(Node, Type), CompileError> {
        let var = match field {
            "transaction_id" => Var::Str(|i| i.transaction_id),
            "account_id" => Var::Str(|i| i.account_id),
            "merchant_id" => Var::Str(|i| i.merchant_id),
            "currency" => Var::Str(|i| i.currency),
            "country" => Var::Str(|i| i.country),
            "channel" => Var::Str(|i| i.channel),
            "merchant_category_code" => Var::Str(|i| i.merchant_category_code),
            "device_id" => Var::Str(|i| i.device_id),
            "ip_address" => Var::Str(|i| i.ip_address),
            "amount" => Var::Amount,
            "amount_minor" => Var::AmountMinor,
            "hour" => Var::Hour,
            "event_time" => Var::EventTime,
            "weekday" => Var::Weekday,
            other => {
                let known: Vec<&str> = TX_FIELDS.iter().map(|(n, _)| *n).collect();
                return Err(self.error(
                    e,
                    format!("tx has no field '{other}' (it has {})", known.join(", ")),
                ));
            }
        };
        let ty = TX_FIELDS
            .iter()
            .find(|(n, _)| *n == field)
            .map_or(Type::String, |(_, t)| *t);
        Ok((Node::Var(var), ty))
    }

    fn two(&mut self, e: &IdedExpr, call: &CallExpr) -> Result<(Typed, Typed), CompileError> {
        let args = self.receiver_and_args(call);
        if args.len() != 2 {
            return Err(self.error(
                e,
                format!("{} takes two operands", display_name(&call.func_name)),
            ));
        }
        Ok((self.compile(args[0])?, self.compile(args[1])?))
    }

    fn receiver_and_args<'c>(&self, call: &'c CallExpr) -> Vec<&'c IdedExpr> {
        call.target
            .iter()
            .map(|t| t.as_ref())
            .chain(call.args.iter())
            .collect()
    }

    fn call(&mut self, e: &IdedExpr, call: &CallExpr) -> Result<(Node, Type), CompileError> {
        let name = call.func_name.as_str();
        match name {
            operators::LOGICAL_AND | operators::LOGICAL_OR => {
                let ((a, ta), (b, tb)) = self.two(e, call)?;
                self.expect(e, ta, Type::Bool, name)?;
                self.expect(e, tb, Type::Bool, name)?;
                let pair = Box::new((a, b));
                Ok((
                    if name == operators::LOGICAL_AND {
                        Node::And(pair)
                    } else {
                        Node::Or(pair)
                    },
                    Type::Bool,
                ))
            }
            operators::LOGICAL_NOT => {
                let (a, t) = self.one(e, call)?;
                self.expect(e, t, Type::Bool, name)?;
                Ok((Node::Not(Box::new(a)), Type::Bool))
            }
            operators::NEGATE => {
                let (a, t) = self.one(e, call)?;
                if !matches!(t, Type::Int | Type::Double) {
                    return Err(self.error(e, format!("cannot negate a {}", t.name())));
                }
                Ok((Node::Neg(Box::new(a)), t))
            }
            operators::CONDITIONAL => {
                let args = self.receiver_and_args(call);
                if args.len() != 3 {
                    return Err(self.error(e, "?: takes three operands"));
                }
                let (c, tc) = self.compile(args[0])?;
                self.expect(e, tc, Type::Bool, "the condition of ?:")?;
                let (a, ta) = self.compile(args[1])?;
                let (b, tb) = self.compile(args[2])?;
                if ta != tb {
                    return Err(self.error(
                        e,
                        format!(
                            "the branches of ?: must have one type, got {} and {}",
                            ta.name(),
                            tb.name()
                        ),
                    ));
                }
                Ok((Node::Cond(Box::new((c, a, b))), ta))
            }
            operators::ADD
            | operators::SUBSTRACT
            | operators::MULTIPLY
            | operators::DIVIDE
            | operators::MODULO => {
                let ((a, ta), (b, tb)) = self.two(e, call)?;
                let op = match name {
                    operators::ADD => Arith::Add,
                    operators::SUBSTRACT => Arith::Sub,
                    operators::MULTIPLY => Arith::Mul,
                    operators::DIVIDE => Arith::Div,
                    _ => Arith::Rem,
                };
                if ta != tb || !ta.numeric() {
                    let hint = if ta.numeric() && tb.numeric() {
                        " (CEL does not mix number types in arithmetic: write 2.0 for a double, \
                         or convert with double() or int())"
                    } else {
                        ""
                    };
                    return Err(self.error(
                        e,
                        format!(
                            "{} does not apply to {} and {}{hint}",
                            display_name(name),
                            ta.name(),
                            tb.name()
                        ),
                    ));
                }
                if matches!(op, Arith::Rem) && ta == Type::Double {
                    return Err(self.error(e, "% does not apply to doubles"));
                }
                Ok((Node::Arith(op, Box::new((a, b))), ta))
            }
            operators::EQUALS
            | operators::NOT_EQUALS
            | operators::LESS
            | operators::LESS_EQUALS
            | operators::GREATER
            | operators::GREATER_EQUALS => {
                let ((a, ta), (b, tb)) = self.two(e, call)?;
                let op = match name {
                    operators::EQUALS => Cmp::Eq,
                    operators::NOT_EQUALS => Cmp::Ne,
                    operators::LESS => Cmp::Lt,
                    operators::LESS_EQUALS => Cmp::Le,
                    operators::GREATER => Cmp::Gt,
                    _ => Cmp::Ge,
                };
                if !(ta == tb || (ta.numeric() && tb.numeric())) {
                    return Err(self.error(
                        e,
                        format!("cannot compare {} with {}", ta.name(), tb.name()),
                    ));
                }
                Ok((Node::Cmp(op, Box::new((a, b))), Type::Bool))
            }
            operators::IN => {
                let args = self.receiver_and_args(call);
                if args.len() != 2 {
                    return Err(self.error(e, "'in' takes two operands"));
                }
                let (a, ta) = self.compile(args[0])?;
                let Expr::List(list) = &args[1].expr else {
                    return Err(self.error(
                        args[1],
                        "the right of 'in' must be a list literal, e.g. ['RU', 'KP'] \
                         (for a list kept at run time use in_list(\"name\", value))",
                    ));
                };
                let mut items = Vec::with_capacity(list.elements.len());
                for item in &list.elements {
                    let Expr::Literal(lit) = &item.expr else {
                        return Err(self.error(item, "a list after 'in' holds literals only"));
                    };
                    let lit = self.literal(item, lit)?;
                    let t = lit.ty();
                    if !(t == ta || (t.numeric() && ta.numeric())) {
                        return Err(self.error(
                            item,
                            format!("a {} cannot be in a list of {}", ta.name(), t.name()),
                        ));
                    }
                    items.push(lit);
                }
                Ok((Node::In(Box::new(a), items.into()), Type::Bool))
            }
            "startsWith" | "endsWith" | "contains" => {
                if call.target.is_none() {
                    return Err(self.error(e, format!("write it as a method: s.{name}(prefix)")));
                }
                let ((a, ta), (b, tb)) = self.two(e, call)?;
                self.expect(e, ta, Type::String, name)?;
                self.expect(e, tb, Type::String, name)?;
                let op = match name {
                    "startsWith" => StrTest::StartsWith,
                    "endsWith" => StrTest::EndsWith,
                    _ => StrTest::Contains,
                };
                Ok((Node::Str(op, Box::new((a, b))), Type::Bool))
            }
            "matches" => {
                let args = self.receiver_and_args(call);
                if args.len() != 2 {
                    return Err(self.error(e, "matches takes a string and a pattern"));
                }
                let (a, ta) = self.compile(args[0])?;
                self.expect(e, ta, Type::String, name)?;
                let Expr::Literal(LiteralValue::String(pattern)) = &args[1].expr else {
                    return Err(
                        self.error(args[1], "the pattern of matches must be a string literal")
                    );
                };
                let pattern = std::string::String::from(pattern.clone());
                let re = regex::RegexBuilder::new(&pattern)
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|err| self.error(args[1], format!("bad pattern: {err}")))?;
                Ok((Node::Matches(Box::new(a), Box::new(re)), Type::Bool))
            }
            "size" => {
                let (a, t) = self.one(e, call)?;
                self.expect(e, t, Type::String, name)?;
                Ok((Node::Size(Box::new(a)), Type::Int))
            }
            "int" => {
                let (a, t) = self.one(e, call)?;
                Ok(match t {
                    Type::Int => (a, Type::Int),
                    Type::Double | Type::Uint => (Node::ToInt(Box::new(a)), Type::Int),
                    other => return Err(self.error(e, format!("int() of a {}", other.name()))),
                })
            }
            "double" => {
                let (a, t) = self.one(e, call)?;
                Ok(match t {
                    Type::Double => (a, Type::Double),
                    Type::Int | Type::Uint => (Node::ToDouble(Box::new(a)), Type::Double),
                    other => return Err(self.error(e, format!("double() of a {}", other.name()))),
                })
            }
            "in_list" => {
                if call.target.is_some() || call.args.len() != 2 {
                    return Err(self.error(e, "write it as in_list(\"list name\", value)"));
                }
                let Expr::Literal(LiteralValue::String(list)) = &call.args[0].expr else {
                    return Err(self.error(&call.args[0], "the list name must be a string literal"));
                };
                let list = std::string::String::from(list.clone());
                let Some(slot) = self.lists.slot(&list) else {
                    return Err(self.error(
                        &call.args[0],
                        format!("unknown list '{list}' (create it with PutListEntries first)"),
                    ));
                };
                let (value, t) = self.compile(&call.args[1])?;
                self.expect(e, t, Type::String, "in_list's value")?;
                Ok((Node::InList(slot, Box::new(value)), Type::Bool))
            }
            operators::INDEX | operators::OPT_INDEX | operators::OPT_SELECT => {
                Err(self.error(e, "indexing is not supported in rules"))
            }
            other => Err(self.error(e, format!("unknown function '{other}'"))),
        }
    }

    fn one(&mut self, e: &IdedExpr, call: &CallExpr) -> Result<(Node, Type), CompileError> {
        let args = self.receiver_and_args(call);
        if args.len() != 1 {
            return Err(self.error(
                e,
                format!("{} takes one operand", display_name(&call.func_name)),
            ));
        }
        self.compile(args[0])
    }

    fn expect(&self, e: &IdedExpr, got: Type, want: Type, what: &str) -> Result<(), CompileError> {
        if got == want {
            Ok(())
        } else {
            Err(self.error(
                e,
                format!(
                    "{} needs a {}, got a {}",
                    display_name(what),
                    want.name(),
                    got.name()
                ),
            ))
        }
    }
}

/// `_&&_` -> `&&`: operators as written.
fn display_name(name: &str) -> &str {
    let trimmed = name.trim_matches('_');
    match trimmed {
        "!" | "-" => trimmed,
        _ if name.starts_with('_') => trimmed,
        _ => name,
    }
}

fn eval<'a>(node: &'a Node, input: &Input<'a>, lists: &Lists) -> Result<Value<'a>, Fault> {
    Ok(match node {
        Node::Lit(l) => l.value(),
        Node::Var(v) => var(*v, input),
        Node::Not(a) => Value::Bool(!truth(eval(a, input, lists)?)),
        Node::Neg(a) => match eval(a, input, lists)? {
            Value::Int(i) => Value::Int(i.checked_neg().ok_or(Fault::Overflow)?),
            Value::Double(d) => Value::Double(-d),
            other => other,
        },
        Node::And(pair) => {
            // CEL: false on either side decides, even when the other side fails.
            match eval(&pair.0, input, lists) {
                Ok(a) if !truth(a) => Value::Bool(false),
                Ok(_) => Value::Bool(truth(eval(&pair.1, input, lists)?)),
                Err(fault) => match eval(&pair.1, input, lists) {
                    Ok(b) if !truth(b) => Value::Bool(false),
                    _ => return Err(fault),
                },
            }
        }
        Node::Or(pair) => match eval(&pair.0, input, lists) {
            Ok(a) if truth(a) => Value::Bool(true),
            Ok(_) => Value::Bool(truth(eval(&pair.1, input, lists)?)),
            Err(fault) => match eval(&pair.1, input, lists) {
                Ok(b) if truth(b) => Value::Bool(true),
                _ => return Err(fault),
            },
        },
        Node::Cond(c) => {
            if truth(eval(&c.0, input, lists)?) {
                eval(&c.1, input, lists)?
            } else {
                eval(&c.2, input, lists)?
            }
        }
        Node::Arith(op, pair) => arith(
            *op,
            eval(&pair.0, input, lists)?,
            eval(&pair.1, input, lists)?,
        )?,
        Node::Cmp(op, pair) => {
            let (a, b) = (eval(&pair.0, input, lists)?, eval(&pair.1, input, lists)?);
            let ord = compare(a, b);
            Value::Bool(match op {
                Cmp::Eq => ord == Some(std::cmp::Ordering::Equal),
                Cmp::Ne => ord != Some(std::cmp::Ordering::Equal),
                Cmp::Lt => ord == Some(std::cmp::Ordering::Less),
                Cmp::Le => matches!(
                    ord,
                    Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal)
                ),
                Cmp::Gt => ord == Some(std::cmp::Ordering::Greater),
                Cmp::Ge => matches!(
                    ord,
                    Some(std::cmp::Ordering::Greater | std::cmp::Ordering::Equal)
                ),
            })
        }
        Node::In(a, items) => {
            let a = eval(a, input, lists)?;
            Value::Bool(
                items
                    .iter()
                    .any(|l| compare(a, l.value()) == Some(std::cmp::Ordering::Equal)),
            )
        }
        Node::Str(op, pair) => {
            let (a, b) = (eval(&pair.0, input, lists)?, eval(&pair.1, input, lists)?);
            let (Value::Str(a), Value::Str(b)) = (a, b) else {
                return Ok(Value::Bool(false));
            };
            Value::Bool(match op {
                StrTest::StartsWith => a.starts_with(b),
                StrTest::EndsWith => a.ends_with(b),
                StrTest::Contains => a.contains(b),
            })
        }
        Node::Matches(a, re) => match eval(a, input, lists)? {
            Value::Str(s) => Value::Bool(re.is_match(s)),
            _ => Value::Bool(false),
        },
        Node::Size(a) => match eval(a, input, lists)? {
            // CEL's size of a string counts code points.
            Value::Str(s) => Value::Int(s.chars().count() as i64),
            other => other,
        },
        Node::ToInt(a) => match eval(a, input, lists)? {
            Value::Double(d) => {
                if !(d.is_finite() && d > -9.223_372_036_854_776e18 && d < 9.223_372_036_854_776e18)
                {
                    return Err(Fault::Conversion);
                }
                Value::Int(d.trunc() as i64)
            }
            Value::Uint(u) => Value::Int(i64::try_from(u).map_err(|_| Fault::Overflow)?),
            other => other,
        },
        Node::ToDouble(a) => match eval(a, input, lists)? {
            Value::Int(i) => Value::Double(i as f64),
            Value::Uint(u) => Value::Double(u as f64),
            other => other,
        },
        Node::InList(slot, value) => match eval(value, input, lists)? {
            Value::Str(s) => Value::Bool(lists.contains(*slot, s, input.event_time)),
            _ => Value::Bool(false),
        },
    })
}

fn truth(v: Value<'_>) -> bool {
    matches!(v, Value::Bool(true))
}

fn var<'a>(v: Var, input: &Input<'a>) -> Value<'a> {
    match v {
        Var::Str(field) => Value::Str(field(input)),
        Var::Amount => Value::Double(input.amount),
        Var::AmountMinor => Value::Int(input.amount_minor),
        Var::Hour => Value::Int(input.event_time.rem_euclid(86_400) / 3_600),
        Var::EventTime => Value::Int(input.event_time),
        // 1970-01-01 was a Thursday; 0 is Sunday, as in CEL's getDayOfWeek.
        Var::Weekday => Value::Int((input.event_time.div_euclid(86_400) + 4).rem_euclid(7)),
        Var::Feature(i) => Value::Double(input.features[i]),
        Var::Score => Value::Double(input.score),
        Var::Anomaly => Value::Double(input.anomaly_score),
        Var::Classifier => Value::Double(input.classifier_score),
    }
}

fn arith<'a>(op: Arith, a: Value<'a>, b: Value<'a>) -> Result<Value<'a>, Fault> {
    Ok(match (a, b) {
        (Value::Int(a), Value::Int(b)) => Value::Int(
            match op {
                Arith::Add => a.checked_add(b),
                Arith::Sub => a.checked_sub(b),
                Arith::Mul => a.checked_mul(b),
                Arith::Div if b == 0 => return Err(Fault::DivisionByZero),
                Arith::Div => a.checked_div(b),
                Arith::Rem if b == 0 => return Err(Fault::DivisionByZero),
                Arith::Rem => a.checked_rem(b),
            }
            .ok_or(Fault::Overflow)?,
        ),
        (Value::Uint(a), Value::Uint(b)) => Value::Uint(
            match op {
                Arith::Add => a.checked_add(b),
                Arith::Sub => a.checked_sub(b),
                Arith::Mul => a.checked_mul(b),
                Arith::Div | Arith::Rem if b == 0 => return Err(Fault::DivisionByZero),
                Arith::Div => a.checked_div(b),
                Arith::Rem => a.checked_rem(b),
            }
            .ok_or(Fault::Overflow)?,
        ),
        (Value::Double(a), Value::Double(b)) => Value::Double(match op {
            Arith::Add => a + b,
            Arith::Sub => a - b,
            Arith::Mul => a * b,
            // IEEE 754, as CEL: x / 0.0 is infinite.
            Arith::Div => a / b,
            Arith::Rem => a % b,
        }),
        // The checker allows no other pairs.
        (a, _) => a,
    })
}

/// CEL ordering: numbers compare across int, uint and double; NaN compares with nothing.
fn compare(a: Value<'_>, b: Value<'_>) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Value::Bool(a), Value::Bool(b)) => Some(a.cmp(&b)),
        (Value::Str(a), Value::Str(b)) => Some(a.cmp(b)),
        (Value::Int(a), Value::Int(b)) => Some(a.cmp(&b)),
        (Value::Uint(a), Value::Uint(b)) => Some(a.cmp(&b)),
        (Value::Int(a), Value::Uint(b)) => Some(i128::from(a).cmp(&i128::from(b))),
        (Value::Uint(a), Value::Int(b)) => Some(i128::from(a).cmp(&i128::from(b))),
        (Value::Double(a), Value::Double(b)) => a.partial_cmp(&b),
        (Value::Double(a), Value::Int(b)) => a.partial_cmp(&(b as f64)),
        (Value::Int(a), Value::Double(b)) => (a as f64).partial_cmp(&b),
        (Value::Double(a), Value::Uint(b)) => a.partial_cmp(&(b as f64)),
        (Value::Uint(a), Value::Double(b)) => (a as f64).partial_cmp(&b),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::N_FEATURES;

    fn input(features: &FeatureVector) -> Input<'_> {
        Input {
            transaction_id: "t1",
            account_id: "acct-1",
            merchant_id: "m-1",
            amount: 1200.0,
            amount_minor: 120_000,
            currency: "EUR",
            country: "FR",
            channel: "CHANNEL_ECOMMERCE",
            merchant_category_code: "5411",
            device_id: "emu-77",
            ip_address: "192.0.2.1",
            event_time: 1_700_000_000 + 2 * 3600,
            features,
            score: 0.4,
            anomaly_score: 0.1,
            classifier_score: 0.5,
        }
    }

    fn run(source: &str) -> Result<bool, String> {
        let lists = Lists::default();
        let f = [1.5; N_FEATURES];
        let c = Compiled::new(source, &lists).map_err(|e| e.message)?;
        c.eval(&input(&f), &lists).map_err(|e| e.to_string())
    }

    #[test]
    fn evaluates_the_rules_analysts_write() {
        assert_eq!(run("tx.amount > 1000.0 && tx.country != 'US'"), Ok(true));
        assert_eq!(
            run("tx.amount > 1000 && tx.country in ['RU', 'KP']"),
            Ok(false)
        );
        assert_eq!(run("features.acct_count_1h >= 1.5"), Ok(true));
        assert_eq!(run("tx.device_id.startsWith('emu-')"), Ok(true));
        assert_eq!(run("tx.device_id.matches('^emu-[0-9]+$')"), Ok(true));
        assert_eq!(run("tx.hour < 6 ? score > 0.3 : score > 0.9"), Ok(true));
        assert_eq!(run("size(tx.account_id) == 6"), Ok(true));
        assert_eq!(run("int(tx.amount) * 100 == tx.amount_minor"), Ok(true));
        assert_eq!(run("tx.amount_minor % 1000 == 0"), Ok(true));
        assert_eq!(run("-tx.amount < 0.0 && !(score > 0.5)"), Ok(true));
        assert_eq!(run("tx.amount_minor == 120000u"), Ok(true));
    }

    #[test]
    fn refuses_at_store_time_with_the_place() {
        let err = run("tx.amount > ").unwrap_err();
        assert!(err.contains("syntax error at line 1"), "{err}");
        let err = run("tx.amount > 1.0 && features.acct_cnt_1h > 2.0").unwrap_err();
        assert!(
            err.contains("unknown feature 'acct_cnt_1h'") && err.contains("column 20"),
            "{err}"
        );
        let err = run("tx.country == 'é€' && features.nope > 1.0").unwrap_err();
        assert!(
            err.contains("unknown feature 'nope'") && err.contains("column 23"),
            "{err}"
        );
        let err = run("tx.amont > 1.0").unwrap_err();
        assert!(err.contains("tx has no field 'amont'"), "{err}");
        let err = run("amount > 1.0").unwrap_err();
        assert!(err.contains("unknown variable 'amount'"), "{err}");
        let err = run("tx.amount * 2 > 10.0").unwrap_err();
        assert!(err.contains("does not mix number types"), "{err}");
        let err = run("tx.country > 3").unwrap_err();
        assert!(err.contains("cannot compare string with int"), "{err}");
        let err = run("tx.amount + 1.0").unwrap_err();
        assert!(err.contains("must be a bool"), "{err}");
        let err = run("in_list('nope', tx.device_id)").unwrap_err();
        assert!(err.contains("unknown list 'nope'"), "{err}");
        let err = run("[1, 2].exists(x, x > 1)").unwrap_err();
        assert!(err.contains("not supported"), "{err}");
        let err = run(&format!("tx.amount > 1.0 {}", "|| true ".repeat(600))).unwrap_err();
        assert!(err.contains("above the limit"), "{err}");
    }

    #[test]
    fn faults_are_per_payment_and_absorbed_where_cel_absorbs_them() {
        assert_eq!(
            run("tx.amount_minor / (tx.amount_minor - 120000) > 1"),
            Err("division by zero".into())
        );
        assert_eq!(run("tx.amount_minor / 0 > 1 && false"), Ok(false));
        assert_eq!(run("tx.amount_minor / 0 > 1 || true"), Ok(true));
        assert_eq!(
            run("9223372036854775807 + tx.amount_minor > 0"),
            Err("integer overflow".into())
        );
    }
}
