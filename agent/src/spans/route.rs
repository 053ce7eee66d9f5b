//! `http.route` for services that declare none: the request path with its identifiers
//! replaced by `{id}`, so that `/orders/42` and `/orders/43` fall into one route.
//!
//! A path segment is an identifier when it is
//! - all digits (`42`);
//! - a UUID (`3f2b0c1e-8a4d-4c6e-9f10-2b3c4d5e6f70`, any case);
//! - hex of at least 16 digits with a digit among them (object ids, hashes);
//! - any token with a run of at least 3 digits (`ORD-12345`, `2024-05-01`, `a1b2c345`),
//!   or of at least 20 characters mixing letters and digits (random tokens).
//!
//! Words are kept, and so are short versions and names with a digit or two (`v1`,
//! `oauth2`, `s3`, `ipv6`). A short word with three digits in a row (`h264`) is taken for
//! an identifier, which is the price of catching `ORD-123`.

/// The templated route of a path (its query and fragment removed).
pub fn template_route(path: &str) -> String {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    if path.is_empty() {
        return "/".to_owned();
    }
    let mut route = String::with_capacity(path.len());
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            route.push('/');
        }
        if is_identifier(segment) {
            route.push_str("{id}");
        } else {
            route.push_str(segment);
        }
    }
    route
}

pub(crate) fn is_identifier(segment: &str) -> bool {
    let bytes = segment.as_bytes();
    if bytes.is_empty() {
        return false;
    }
    let digits = bytes.iter().filter(|c| c.is_ascii_digit()).count();
    if digits == 0 {
        return false;
    }
    if digits == bytes.len() || is_uuid(bytes) {
        return true;
    }
    if bytes.len() >= 16 && bytes.iter().all(u8::is_ascii_hexdigit) {
        return true;
    }
    let longest_digit_run = bytes
        .split(|c| !c.is_ascii_digit())
        .map(<[u8]>::len)
        .max()
        .unwrap_or(0);
    let letters = bytes.iter().any(u8::is_ascii_alphabetic);
    longest_digit_run >= 3 || (bytes.len() >= 20 && letters)
}

fn is_uuid(b: &[u8]) -> bool {
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_ids_are_templated() {
        assert_eq!(template_route("/orders/42"), "/orders/{id}");
        assert_eq!(
            template_route("/orders/42/items/7"),
            "/orders/{id}/items/{id}"
        );
    }

    #[test]
    fn words_and_versions_are_kept() {
        assert_eq!(template_route("/api/v1/users"), "/api/v1/users");
        assert_eq!(template_route("/oauth2/token"), "/oauth2/token");
        assert_eq!(template_route("/s3/buckets/models"), "/s3/buckets/models");
        assert_eq!(template_route("/"), "/");
        assert_eq!(template_route(""), "/");
        assert_eq!(template_route("/orders/"), "/orders/");
        assert_eq!(template_route("/files/model.stl"), "/files/model.stl");
    }

    #[test]
    fn query_and_fragment_are_stripped() {
        assert_eq!(template_route("/orders/42?status=new"), "/orders/{id}");
        assert_eq!(template_route("/search?q=1#top"), "/search");
        assert_eq!(template_route("?x=1"), "/");
    }

    #[test]
    fn uuids_and_long_hex_are_templated() {
        assert_eq!(
            template_route("/models/3F2B0C1E-8A4D-4C6E-9F10-2B3C4D5E6F70/slice"),
            "/models/{id}/slice"
        );
        assert_eq!(
            template_route("/objects/507f1f77bcf86cd799439011"),
            "/objects/{id}"
        );
        assert_eq!(
            template_route("/blobs/da39a3ee5e6b4b0d3255bfef95601890afd80709"),
            "/blobs/{id}"
        );
    }

    #[test]
    fn business_ids_with_letters_are_templated() {
        assert_eq!(template_route("/orders/ORD-12345"), "/orders/{id}");
        assert_eq!(
            template_route("/orders/ord_123/status"),
            "/orders/{id}/status"
        );
        assert_eq!(template_route("/reports/2024-05-01"), "/reports/{id}");
        assert_eq!(
            template_route("/sessions/aZ3kQ9xP2mL7vB1nC8dE"),
            "/sessions/{id}"
        );
    }

    #[test]
    fn hex_looking_words_are_kept() {
        assert_eq!(template_route("/cafe/decaf"), "/cafe/decaf");
        assert_eq!(template_route("/feed/added"), "/feed/added");
    }
}
