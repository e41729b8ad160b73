//! Reading the Prometheus text exposition format that `/metrics` serves,
//! for `pgfanout status` (which scrapes a running sidecar) and the tests.

/// One sample of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Parses the Prometheus text exposition format (comments and unparsable
/// lines are skipped).
pub fn parse_samples(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let (labels, rest) = parse_labels(&line[open + 1..])?;
            (&line[..open], labels, rest)
        }
        None => {
            let (name, rest) = line.split_once(char::is_whitespace)?;
            (name, Vec::new(), rest)
        }
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample { name: name.trim().to_string(), labels, value })
}

/// Parses `k="v",k2="v2"}` and returns the labels and what follows the brace.
fn parse_labels(s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after) = rest.split_once('=')?;
        let mut chars = after.strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim().to_string(), value));
        rest = &after[1 + end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_exposition_format() {
        let text = "# HELP pgfanout_changes_total Row changes\n\
                    # TYPE pgfanout_changes_total counter\n\
                    pgfanout_changes_total{table=\"public.engagement_events\",stage=\"delivered\"} 42\n\
                    pgfanout_replication_lag_seconds 0.25\n\
                    odd{a=\"x\\\"y,z\",b=\"\"} +Inf\n\
                    broken{a=\"x} 1\n";
        let s = parse_samples(text);
        assert_eq!(s.len(), 3, "{s:?}");
        assert_eq!(s[0].name, "pgfanout_changes_total");
        assert_eq!(s[0].label("table"), Some("public.engagement_events"));
        assert_eq!(s[0].label("stage"), Some("delivered"));
        assert_eq!(s[0].value, 42.0);
        assert_eq!((s[1].name.as_str(), s[1].value), ("pgfanout_replication_lag_seconds", 0.25));
        assert_eq!(s[2].label("a"), Some("x\"y,z"));
        assert_eq!(s[2].label("b"), Some(""));
        assert_eq!(s[2].value, f64::INFINITY);
    }
}
