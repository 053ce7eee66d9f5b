//! Segment patterns: URL path templates (`/api/orders/{order_id}`, `/shop/*/orders/**`)
//! and AMQP topic patterns for routing keys (`order.*`, `order.#`).

/// One segment of a pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    /// `*`: any one segment.
    One,
    /// `**` in paths, `#` in routing keys: any number of segments, none included.
    Many,
    /// `{name}`: any one non-empty segment, kept under its name.
    Capture(String),
}

/// A pattern over the segments of a path (split at `/`) or a routing key (at `.`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    parts: Vec<Part>,
    separator: char,
}

/// Most `**` (or `#`) in one pattern: each can make matching try every split.
const MAX_MANY: usize = 2;
/// Segments of a path or routing key looked at; longer ones do not match.
const MAX_SEGMENTS: usize = 64;

impl Pattern {
    /// A URL path template: `/` then segments that are text, `*`, `**` or `{name}`.
    pub fn path(text: &str) -> Result<Self, String> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!("path template {text:?} must start with `/`"));
        };
        let mut parts = Vec::new();
        for seg in rest.split('/') {
            parts.push(match seg {
                "*" => Part::One,
                "**" => Part::Many,
                _ => match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    Some(name) if !name.is_empty() && !name.contains(['{', '}']) => {
                        Part::Capture(name.to_owned())
                    }
                    Some(_) => {
                        return Err(format!(
                            "path template {text:?}: a placeholder is `{{name}}`, a whole segment"
                        ));
                    }
                    None if seg.contains(['{', '}']) => {
                        return Err(format!(
                            "path template {text:?}: a placeholder must be a whole segment, as in /orders/{{order_id}}"
                        ));
                    }
                    None => Part::Literal(seg.to_owned()),
                },
            });
        }
        Self::checked(parts, '/', text)
    }

    /// An AMQP topic pattern: words separated by `.`, `*` for one word, `#` for any.
    pub fn topic(text: &str) -> Result<Self, String> {
        let parts = text
            .split('.')
            .map(|w| match w {
                "*" => Part::One,
                "#" => Part::Many,
                _ => Part::Literal(w.to_owned()),
            })
            .collect();
        Self::checked(parts, '.', text)
    }

    fn checked(parts: Vec<Part>, separator: char, text: &str) -> Result<Self, String> {
        if parts.iter().filter(|p| **p == Part::Many).count() > MAX_MANY {
            return Err(format!(
                "pattern {text:?}: at most {MAX_MANY} of `**` (or `#`) in one pattern"
            ));
        }
        let mut names: Vec<&str> = Vec::new();
        for p in &parts {
            if let Part::Capture(n) = p {
                if names.contains(&n.as_str()) {
                    return Err(format!("path template {text:?}: {{{n}}} appears twice"));
                }
                names.push(n);
            }
        }
        Ok(Pattern { parts, separator })
    }

    /// The names of its `{placeholders}`, in order.
    pub fn captures(&self) -> Vec<&str> {
        self.parts
            .iter()
            .filter_map(|p| match p {
                Part::Capture(n) => Some(n.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Whether `text` matches; if it does, the segment each placeholder took, in order.
    pub fn matches<'t>(&self, text: &'t str) -> Option<Vec<&'t str>> {
        let text = if self.separator == '/' {
            text.strip_prefix('/')?
        } else {
            text
        };
        let segs: Vec<&str> = text.split(self.separator).take(MAX_SEGMENTS + 1).collect();
        if segs.len() > MAX_SEGMENTS {
            return None;
        }
        let mut taken = Vec::new();
        match_parts(&self.parts, &segs, &mut taken).then_some(taken)
    }
}

fn match_parts<'t>(parts: &[Part], segs: &[&'t str], taken: &mut Vec<&'t str>) -> bool {
    let Some((part, rest)) = parts.split_first() else {
        return segs.is_empty();
    };
    match part {
        Part::Many => {
            let mark = taken.len();
            for skip in 0..=segs.len() {
                if match_parts(rest, &segs[skip..], taken) {
                    return true;
                }
                taken.truncate(mark);
            }
            false
        }
        _ => {
            let Some((seg, more)) = segs.split_first() else {
                return false;
            };
            let ok = match part {
                Part::Literal(l) => l == seg,
                Part::One => true,
                Part::Capture(_) => {
                    taken.push(seg);
                    !seg.is_empty()
                }
                Part::Many => unreachable!("handled above"),
            };
            ok && match_parts(rest, more, taken)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_templates_capture_their_placeholders() {
        let p = Pattern::path("/api/orders/{order_id}").unwrap();
        assert_eq!(p.captures(), ["order_id"]);
        assert_eq!(p.matches("/api/orders/42"), Some(vec!["42"]));
        assert_eq!(p.matches("/api/orders/42/items"), None);
        assert_eq!(p.matches("/api/orders/"), None);
        assert_eq!(p.matches("/api/order/42"), None);

        let p = Pattern::path("/**/orders/{id}/**").unwrap();
        assert_eq!(p.matches("/orders/7"), Some(vec!["7"]));
        assert_eq!(p.matches("/v1/shop/orders/7/status"), Some(vec!["7"]));
        assert_eq!(p.matches("/v1/shop/orders"), None);

        let p = Pattern::path("/shops/*/orders/{o}/lines/{l}").unwrap();
        assert_eq!(
            p.matches("/shops/s1/orders/9/lines/3"),
            Some(vec!["9", "3"])
        );
    }

    #[test]
    fn topic_patterns_match_as_rabbitmq_does() {
        let p = Pattern::topic("order.*").unwrap();
        assert!(p.matches("order.created").is_some());
        assert!(p.matches("order.created.eu").is_none());
        let p = Pattern::topic("order.#").unwrap();
        assert!(p.matches("order").is_some());
        assert!(p.matches("order.a.b").is_some());
        assert!(p.matches("orders.a").is_none());
    }

    #[test]
    fn bad_templates_say_why() {
        for (t, why) in [
            ("orders/{id}", "start with `/`"),
            ("/orders/x{id}", "whole segment"),
            ("/orders/{}", "`{name}`"),
            ("/{a}/{a}", "twice"),
            ("/**/a/**/b/**", "at most 2"),
        ] {
            let err = Pattern::path(t).unwrap_err();
            assert!(err.contains(why), "{t}: {err}");
        }
    }

    #[test]
    fn long_paths_do_not_match_and_cost_little() {
        let p = Pattern::path("/**/x/**").unwrap();
        let long = "/a".repeat(10_000);
        assert_eq!(p.matches(&long), None);
        let many = "/a".repeat(60) + "/y";
        assert_eq!(p.matches(&many), None);
    }
}
