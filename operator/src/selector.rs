//! Label selector matching with upstream semantics: matchLabels and matchExpressions are ANDed,
//! `{}` matches everything, NotIn and DoesNotExist match objects without the key.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use std::collections::BTreeMap;

/// Labels of an object.
pub type Labels = BTreeMap<String, String>;

/// Whether `labels` satisfy `sel`. An unknown operator matches nothing (validation reports it),
/// so a typo can never widen a policy.
pub fn matches(sel: &LabelSelector, labels: &Labels) -> bool {
    let labels_ok = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    labels_ok
        && sel.match_expressions.iter().flatten().all(|e| {
            let values = e.values.as_deref().unwrap_or_default();
            let got = labels.get(&e.key);
            match e.operator.as_str() {
                "In" => got.is_some_and(|v| values.contains(v)),
                "NotIn" => got.is_none_or(|v| !values.contains(v)),
                "Exists" => got.is_some(),
                "DoesNotExist" => got.is_none(),
                _ => false,
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn l(kv: &[(&str, &str)]) -> Labels {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: key.into(),
                operator: op.into(),
                values: if values.is_empty() {
                    None
                } else {
                    Some(values.iter().map(|s| s.to_string()).collect())
                },
            }]),
            match_labels: None,
        }
    }

    #[test]
    fn empty_selector_matches_all() {
        assert!(matches(&LabelSelector::default(), &l(&[])));
        assert!(matches(&LabelSelector::default(), &l(&[("a", "b")])));
    }

    #[test]
    fn operators() {
        let x = l(&[("ns", "x")]);
        let none = l(&[]);
        assert!(matches(&expr("ns", "In", &["x", "y"]), &x));
        assert!(!matches(&expr("ns", "In", &["y"]), &x));
        assert!(!matches(&expr("ns", "In", &["x"]), &none));
        assert!(!matches(&expr("ns", "NotIn", &["x"]), &x));
        assert!(matches(&expr("ns", "NotIn", &["x"]), &none));
        assert!(matches(&expr("ns", "Exists", &[]), &x));
        assert!(!matches(&expr("ns", "Exists", &[]), &none));
        assert!(matches(&expr("ns", "DoesNotExist", &[]), &none));
        assert!(!matches(&expr("ns", "Bogus", &[]), &x));
    }
}
