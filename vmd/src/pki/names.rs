//! Validated names that end up in certificates and file names.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use rustls_pki_types::DnsName;

use super::{PkiError, SERVER_DNS_NAME};

/// Longest allowed client name: one DNS label.
const CLIENT_NAME_MAX_LEN: usize = 63;

/// A validated client name, used as the SAN DNS name and common name of a
/// client certificate and as its file name under `clients/`.
///
/// It is a single DNS label: 1 to 63 characters of `[a-z0-9-]`, neither
/// starting nor ending with `-`. That keeps it safe as a file name (no `/`,
/// no `.`) and valid as a DNS name.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct ClientName(String);

/// A string that is not a valid [`ClientName`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid client name {name:?}: {reason}")]
pub struct ClientNameError {
    name: String,
    reason: &'static str,
}

impl ClientNameError {
    /// The rejected name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Why it was rejected.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

impl ClientName {
    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn check(s: &str) -> Result<(), &'static str> {
        if s.is_empty() {
            return Err("must not be empty");
        }
        if s.len() > CLIENT_NAME_MAX_LEN {
            return Err("must be at most 63 characters");
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err("must contain only a-z, 0-9 and '-'");
        }
        if s.starts_with('-') || s.ends_with('-') {
            return Err("must not start or end with '-'");
        }
        Ok(())
    }
}

impl TryFrom<String> for ClientName {
    type Error = ClientNameError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        match Self::check(&s) {
            Ok(()) => Ok(Self(s)),
            Err(reason) => Err(ClientNameError { name: s, reason }),
        }
    }
}

impl FromStr for ClientName {
    type Err = ClientNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::try_from(s.to_owned())
    }
}

impl From<ClientName> for String {
    fn from(name: ClientName) -> Self {
        name.0
    }
}

impl AsRef<str> for ClientName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClientName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Subject alternative names of the server certificate. [`SERVER_DNS_NAME`]
/// (`"vmd"`) is always included in the DNS names, whether listed or not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerNames {
    /// Extra DNS names (host names) besides `"vmd"`.
    pub dns: Vec<String>,
    /// IP addresses.
    pub ips: Vec<IpAddr>,
}

/// [`ServerNames`] after validation: lowercase, deduplicated, `"vmd"` first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ResolvedServerNames {
    pub(super) dns: Vec<String>,
    pub(super) ips: Vec<IpAddr>,
}

impl ServerNames {
    /// Names for a development setup: `vmd`, `localhost`, `127.0.0.1`, `::1`.
    pub fn dev() -> Self {
        Self {
            dns: vec![SERVER_DNS_NAME.to_owned(), "localhost".to_owned()],
            ips: vec![
                IpAddr::from(std::net::Ipv4Addr::LOCALHOST),
                IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            ],
        }
    }

    /// Validates the names. A DNS entry that parses as an IP address is
    /// treated as one.
    pub(super) fn resolve(&self) -> Result<ResolvedServerNames, PkiError> {
        let mut dns = vec![SERVER_DNS_NAME.to_owned()];
        let mut ips: Vec<IpAddr> = Vec::new();
        for name in &self.dns {
            if let Ok(ip) = name.parse::<IpAddr>() {
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
                continue;
            }
            let lower = name.to_ascii_lowercase();
            DnsName::try_from(lower.as_str()).map_err(|source| PkiError::InvalidDnsName {
                name: name.clone(),
                source,
            })?;
            if !dns.contains(&lower) {
                dns.push(lower);
            }
        }
        for ip in &self.ips {
            if !ips.contains(ip) {
                ips.push(*ip);
            }
        }
        Ok(ResolvedServerNames { dns, ips })
    }
}
