//! Rules that a value must satisfy on its own, before the app layer looks at anything stored.
//!
//! Each failure names the field it is about, so the API can say exactly what was wrong.

use std::fmt;

/// A field that failed a rule, with a sentence saying which rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for ValidationError {}

/// Characters Windows 365 refuses in a provisioning policy name.
const POLICY_NAME_FORBIDDEN: &[char] = &['<', '>', '&', '|', '"', '^'];

/// A display name: not blank, at most `max` characters, no control characters.
pub fn display_name(field: &str, value: &str, max: usize) -> Result<(), ValidationError> {
    if value.trim().is_empty() {
        return Err(ValidationError::new(field, "is required and cannot be blank"));
    }
    let len = value.chars().count();
    if len > max {
        return Err(ValidationError::new(field, format!("is {len} characters long; the limit is {max}")));
    }
    if value.chars().any(char::is_control) {
        return Err(ValidationError::new(field, "cannot contain control characters"));
    }
    Ok(())
}

/// A provisioning policy's name: a display name without `< > & | " ^`.
pub fn policy_name(value: &str) -> Result<(), ValidationError> {
    display_name("displayName", value, 256)?;
    if let Some(c) = value.chars().find(|c| POLICY_NAME_FORBIDDEN.contains(c)) {
        return Err(ValidationError::new(
            "displayName",
            format!("cannot contain '{c}' (the characters < > & | \" ^ are not allowed)"),
        ));
    }
    Ok(())
}

/// An optional free-text field: at most `max` characters, no control characters but newlines.
pub fn description(field: &str, value: &str, max: usize) -> Result<(), ValidationError> {
    let len = value.chars().count();
    if len > max {
        return Err(ValidationError::new(field, format!("is {len} characters long; the limit is {max}")));
    }
    if value.chars().any(|c| c.is_control() && c != '\n' && c != '\r' && c != '\t') {
        return Err(ValidationError::new(field, "cannot contain control characters"));
    }
    Ok(())
}

/// A user principal name: `local@domain`, as in the directory.
pub fn user_principal_name(value: &str) -> Result<(), ValidationError> {
    const FIELD: &str = "userPrincipalName";
    if value.len() > 113 {
        return Err(ValidationError::new(FIELD, "is longer than 113 characters"));
    }
    let Some((local, domain)) = value.split_once('@') else {
        return Err(ValidationError::new(FIELD, "must look like name@domain"));
    };
    if local.is_empty() || local.len() > 64 {
        return Err(ValidationError::new(FIELD, "must have 1 to 64 characters before '@'"));
    }
    let local_ok = local.chars().all(|c| c.is_ascii_alphanumeric() || "'.-_!#^~".contains(c));
    if !local_ok || local.starts_with('.') || local.ends_with('.') || local.contains("..") {
        return Err(ValidationError::new(
            FIELD,
            "may use only letters, digits and ' . - _ ! # ^ ~ before '@', without leading, trailing or double dots",
        ));
    }
    domain_name(FIELD, domain)
}

/// An email address (the `mail` field): the same shape as a user principal name.
pub fn mail(value: &str) -> Result<(), ValidationError> {
    user_principal_name(value).map_err(|e| ValidationError::new("mail", e.message))
}

fn domain_name(field: &str, domain: &str) -> Result<(), ValidationError> {
    let labels: Vec<&str> = domain.split('.').collect();
    let ok = labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(field, format!("has an invalid domain '{domain}'")))
    }
}

/// A short machine-friendly name (mailNickname, SKU part numbers): letters, digits, `-`, `_`, `.`.
pub fn nickname(field: &str, value: &str, max: usize) -> Result<(), ValidationError> {
    if value.is_empty() || value.len() > max {
        return Err(ValidationError::new(field, format!("must have 1 to {max} characters")));
    }
    if !value.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err(ValidationError::new(field, "may use only letters, digits, '-', '_' and '.'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_policy_name_forbidden_characters_refused() {
        for bad in ["a<b", "a>b", "a&b", "a|b", "a\"b", "a^b"] {
            let err = policy_name(bad).unwrap_err();
            assert_eq!(err.field, "displayName");
        }
        assert!(policy_name("Finance - Berlin (2)").is_ok());
    }

    #[test]
    fn test_display_name_blank_or_long_refused() {
        assert!(display_name("displayName", "  ", 10).is_err());
        assert!(display_name("displayName", "12345678901", 10).is_err());
        assert!(display_name("displayName", "a\u{7}b", 10).is_err());
        assert!(display_name("displayName", "ok", 10).is_ok());
    }

    #[test]
    fn test_user_principal_name_shapes() {
        assert!(user_principal_name("adele.vance@contoso.com").is_ok());
        for bad in ["adele", "@contoso.com", "adele@", "adele@contoso", "a..b@c.com", "a b@c.com", "a@-c.com"] {
            assert!(user_principal_name(bad).is_err(), "{bad} should be refused");
        }
    }
}
