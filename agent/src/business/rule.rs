//! One rule as the config file writes it (the `business:` section) and as it is applied.
//! Every check of a rule happens while the file is read, so that a bad rule is an
//! error naming its line.

use serde::Deserialize;

use super::{Exchange, ExchangeView, ORDER_ID, ORDER_STATUS, json::JsonPath, pattern::Pattern};

/// The `business:` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusinessConfig {
    /// Keep the default rules after the file's own (order.id and order.status from the
    /// common spellings).
    #[serde(default = "yes")]
    pub defaults: bool,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

impl Default for BusinessConfig {
    fn default() -> Self {
        BusinessConfig {
            defaults: true,
            rules: Vec::new(),
        }
    }
}

fn yes() -> bool {
    true
}

/// Which part of an exchange a header or JSON rule reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BodySide {
    /// The HTTP request.
    Request,
    /// The HTTP response.
    Response,
    /// The AMQP message.
    Message,
}

/// Where a rule's value comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// The segment a placeholder of a path template took (`capture` is its index).
    Path {
        pattern: Pattern,
        capture: usize,
    },
    Query(String),
    /// An HTTP header (name in lower case), of the request, the response, or the request
    /// then the response.
    Header {
        name: String,
        side: Option<BodySide>,
    },
    /// A field of a JSON body (any of `paths`): of one side, or of any (request,
    /// response, message).
    Json {
        paths: Vec<JsonPath>,
        side: Option<BodySide>,
    },
    /// A header of the AMQP message (its headers table), names compared without case.
    AmqpHeader(String),
}

impl Source {
    /// Whether the value comes from a header, parameter or field the redactor calls
    /// secret.
    fn is_secret(&self, redactor: &super::Redactor) -> bool {
        match self {
            Source::Path { .. } => false,
            Source::Query(name) => redactor.is_secret_name(name),
            Source::Header { name, .. } | Source::AmqpHeader(name) => {
                redactor.is_secret_header(name)
            }
            Source::Json { paths, .. } => paths
                .iter()
                .any(|p| p.last_key().is_some_and(|k| redactor.is_secret_name(k))),
        }
    }
}

/// A rule: where a value comes from, the attribute it becomes, and where it applies.
#[derive(Clone, Debug)]
pub struct Rule {
    pub attribute: &'static str,
    pub source: Source,
    pub service: Option<String>,
    /// Upper case.
    pub method: Option<String>,
    pub route: Option<Pattern>,
    pub exchange: Option<String>,
    pub routing_key: Option<Pattern>,
    /// Default path rules take only segments that look like identifiers.
    pub identifiers_only: bool,
}

impl<'de> Deserialize<'de> for Rule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spec = RuleSpec::deserialize(d)?;
        Rule::try_from(spec).map_err(serde::de::Error::custom)
    }
}

/// A rule as written in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    /// The attribute set; `order.id` if not given.
    attribute: Option<String>,
    path: Option<String>,
    /// The placeholder of `path` whose segment is the value, when it has several.
    capture: Option<String>,
    query: Option<String>,
    header: Option<String>,
    json: Option<String>,
    amqp_header: Option<String>,
    #[serde(rename = "in")]
    side: Option<BodySide>,
    service: Option<String>,
    method: Option<String>,
    route: Option<String>,
    exchange: Option<String>,
    routing_key: Option<String>,
}

impl TryFrom<RuleSpec> for Rule {
    type Error = String;

    fn try_from(s: RuleSpec) -> Result<Self, String> {
        let named: Vec<&str> = [
            ("path", s.path.is_some()),
            ("query", s.query.is_some()),
            ("header", s.header.is_some()),
            ("json", s.json.is_some()),
            ("amqp_header", s.amqp_header.is_some()),
        ]
        .iter()
        .filter(|(_, set)| *set)
        .map(|(n, _)| *n)
        .collect();
        if named.len() != 1 {
            return Err(format!(
                "a rule takes its value from exactly one of path, query, header, json, amqp_header; this one names {}",
                if named.is_empty() {
                    "none".to_owned()
                } else {
                    named.join(" and ")
                }
            ));
        }
        if s.capture.is_some() && s.path.is_none() {
            return Err("`capture` goes with `path`".into());
        }
        if s.side.is_some() && s.header.is_none() && s.json.is_none() {
            return Err("`in` goes with `header` or `json`".into());
        }
        let source = if let Some(template) = &s.path {
            let pattern = Pattern::path(template)?;
            let names = pattern.captures();
            let capture = match (&s.capture, names.len()) {
                (None, 1) => 0,
                (None, 0) => {
                    return Err(format!(
                        "path template {template:?} has no {{placeholder}} to take the value from"
                    ));
                }
                (None, _) => {
                    return Err(format!(
                        "path template {template:?} has several placeholders: say which with `capture`"
                    ));
                }
                (Some(c), _) => names.iter().position(|n| n == c).ok_or_else(|| {
                    format!("`capture: {c}` is not a placeholder of {template:?}")
                })?,
            };
            Source::Path { pattern, capture }
        } else if let Some(q) = s.query {
            non_empty("query", &q)?;
            Source::Query(q)
        } else if let Some(h) = s.header {
            non_empty("header", &h)?;
            if s.side == Some(BodySide::Message) {
                return Err("for a header of an AMQP message use `amqp_header`".into());
            }
            Source::Header {
                name: h.to_ascii_lowercase(),
                side: s.side,
            }
        } else if let Some(j) = s.json {
            Source::Json {
                paths: vec![JsonPath::parse(&j)?],
                side: s.side,
            }
        } else {
            let h = s.amqp_header.unwrap_or_default();
            non_empty("amqp_header", &h)?;
            Source::AmqpHeader(h)
        };
        let attribute = match s.attribute.as_deref() {
            None | Some(ORDER_ID) => ORDER_ID,
            Some(ORDER_STATUS) => ORDER_STATUS,
            Some(name) => {
                if name.is_empty()
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                {
                    return Err(format!(
                        "attribute {name:?}: names are letters, digits, `.`, `_` and `-`"
                    ));
                }
                // Attribute keys are `&'static str` everywhere; a rule's name is read once,
                // when the file is, and lives as long as the agent.
                Box::leak(name.to_owned().into_boxed_str())
            }
        };
        Ok(Rule {
            attribute,
            source,
            service: s.service,
            method: s.method.map(|m| m.to_ascii_uppercase()),
            route: s.route.as_deref().map(Pattern::path).transpose()?,
            exchange: s.exchange,
            routing_key: s.routing_key.as_deref().map(Pattern::topic).transpose()?,
            identifiers_only: false,
        })
    }
}

fn non_empty(what: &str, v: &str) -> Result<(), String> {
    if v.trim().is_empty() {
        return Err(format!("`{what}` names nothing"));
    }
    Ok(())
}

impl Rule {
    /// Whether the rule's value comes from somewhere the redactor calls secret.
    pub fn reads_secret(&self, redactor: &super::Redactor) -> bool {
        self.source.is_secret(redactor)
    }

    /// A rule with no restriction, for the defaults.
    pub(super) fn default_rule(attribute: &'static str, source: Source) -> Self {
        Rule {
            attribute,
            source,
            service: None,
            method: None,
            route: None,
            exchange: None,
            routing_key: None,
            identifiers_only: false,
        }
    }

    /// Whether the rule's restrictions let it apply to `view`. A restriction on what the
    /// exchange does not have (an HTTP method on an AMQP message) does not let it.
    pub(super) fn applies_to(&self, view: &ExchangeView<'_>) -> bool {
        if self.service.as_deref().is_some_and(|s| s != view.service) {
            return false;
        }
        match &view.exchange {
            Exchange::Http(h) => {
                self.exchange.is_none()
                    && self.routing_key.is_none()
                    && self
                        .method
                        .as_deref()
                        .is_none_or(|m| m.eq_ignore_ascii_case(h.method))
                    && self
                        .route
                        .as_ref()
                        .is_none_or(|r| h.path.is_some_and(|p| r.matches(p).is_some()))
                    && !matches!(
                        self.source,
                        Source::AmqpHeader(_)
                            | Source::Json {
                                side: Some(BodySide::Message),
                                ..
                            }
                    )
            }
            Exchange::Amqp(m) => {
                self.method.is_none()
                    && self.route.is_none()
                    && self.exchange.as_deref().is_none_or(|e| e == m.exchange)
                    && self
                        .routing_key
                        .as_ref()
                        .is_none_or(|k| k.matches(&m.routing_key).is_some())
                    && matches!(
                        self.source,
                        Source::AmqpHeader(_)
                            | Source::Json {
                                side: None | Some(BodySide::Message),
                                ..
                            }
                    )
            }
        }
    }
}
