//! Authorization: who a verified peer is allowed to be, and what it may do.
//!
//! 1. [`Policy::admit`] runs once per connection, after the TLS handshake,
//!    with the certificate identity and the transport peer:
//!    - the identity's rule is found by certificate name; if the rule pins
//!      a key (SPKI SHA-256), the certificate must carry that key;
//!    - the rule's transport restrictions hold (allowed transports, TCP
//!      networks), and on vsock the kernel-reported peer CID must be the
//!      CID the identity is bound to, and on the listener's allow-list;
//!    - a refusal is a [`Denial`]: the session is refused at `Hello`.
//! 2. An identity no rule names gets the default role, which is "none"
//!    unless configured: the session is welcomed with no rights and every
//!    request answers `Forbidden` (default deny, but the client learns why).
//! 3. The resulting [`Grant`] travels with the session: its role gates each
//!    request, its `visible` scope hides other VMs entirely (lists omit
//!    them, lookups say not found), and its `change` scope limits which
//!    VMs its role may change.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::Deserialize;
use vmd_proto::{Role, VmName};

use crate::tls::PeerIdentity;
use crate::transport::PeerAddr;

/// VM name patterns: exact names, `*` (any run of characters) and `?`
/// (one character).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope(Vec<String>);

impl Scope {
    /// Every VM.
    pub fn all() -> Self {
        Self(vec!["*".into()])
    }

    /// No VM.
    pub fn none() -> Self {
        Self(Vec::new())
    }

    /// The given patterns.
    pub fn of(patterns: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self(patterns.into_iter().map(Into::into).collect())
    }

    /// Whether `vm` matches a pattern.
    pub fn contains(&self, vm: &VmName) -> bool {
        self.0
            .iter()
            .any(|p| glob(p.as_bytes(), vm.as_str().as_bytes()))
    }
}

/// Matches `*` and `?` wildcards (no character classes).
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // Where the last `*` was, and the text position it has consumed up to.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// A transport a rule may allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// TCP.
    Tcp,
    /// AF_VSOCK.
    Vsock,
}

impl Transport {
    fn of(peer: &PeerAddr) -> Self {
        match peer {
            PeerAddr::Tcp(_) => Self::Tcp,
            // A hybrid vsock peer is a guest's vsock connection, forwarded.
            PeerAddr::Vsock { .. } | PeerAddr::HybridVsock { .. } => Self::Vsock,
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Vsock => "vsock",
        })
    }
}

/// An IP network in CIDR notation (`10.0.0.0/8`, `::1/128`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

/// A CIDR string could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid network {0:?} (expected ADDRESS/PREFIX, e.g. 10.0.0.0/8)")]
pub struct IpNetError(String);

impl FromStr for IpNet {
    type Err = IpNetError;

    fn from_str(s: &str) -> Result<Self, IpNetError> {
        let err = || IpNetError(s.to_owned());
        let (addr, prefix) = s.split_once('/').ok_or_else(err)?;
        let addr: IpAddr = addr.parse().map_err(|_| err())?;
        let prefix: u8 = prefix.parse().map_err(|_| err())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(err());
        }
        Ok(Self { addr, prefix })
    }
}

impl IpNet {
    /// Whether `ip` is in the network (IPv4-mapped IPv6 peers count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Where an identity must connect from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Binding {
    /// A vsock peer with this CID.
    Cid(u32),
    /// A vsock peer with the CID the inventory declares for this VM.
    Vm(VmName),
}

/// One identity's rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityRule {
    /// The certificate name (SAN DNS name, else CN).
    pub name: String,
    /// If set, the certificate's key must have this SPKI SHA-256 (hex).
    pub spki_sha256: Option<String>,
    /// The role; `None` for no rights.
    pub role: Option<Role>,
    /// VMs the identity may see at all.
    pub visible: Scope,
    /// VMs its role may change (operator and admin rights).
    pub change: Scope,
    /// vsock peers must be this VM/CID.
    pub binding: Option<Binding>,
    /// Transports it may use (`None`: any).
    pub transports: Option<Vec<Transport>>,
    /// TCP peers must be in one of these networks (empty: any).
    pub tcp_networks: Vec<IpNet>,
}

impl IdentityRule {
    /// A rule with the role's default scopes: everything visible; changes
    /// nowhere unless given.
    pub fn new(name: impl Into<String>, role: Option<Role>) -> Self {
        Self {
            name: name.into(),
            spki_sha256: None,
            role,
            visible: Scope::all(),
            change: Scope::none(),
            binding: None,
            transports: None,
            tcp_networks: Vec::new(),
        }
    }
}

/// Who may do what.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Rules by identity.
    pub identities: Vec<IdentityRule>,
    /// The role of authenticated identities no rule names (`None`: no rights).
    pub default_role: Option<Role>,
    /// If set, only these CIDs may connect over vsock.
    pub vsock_allowed_cids: Option<Vec<u32>>,
}

/// What a session may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The role; `None` for no rights.
    pub role: Option<Role>,
    /// VMs the session may see.
    pub visible: Scope,
    /// VMs the session's role may change.
    pub change: Scope,
    /// Whether a rule named the identity (else the default applied).
    pub matched: bool,
}

/// Why a connection is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    /// The certificate's key is not the pinned one.
    #[error("{identity}: certificate key does not match the pinned fingerprint")]
    KeyMismatch {
        /// The identity.
        identity: String,
    },
    /// The identity may not use this transport.
    #[error("{identity} may not connect over {transport}")]
    Transport {
        /// The identity.
        identity: String,
        /// The transport used.
        transport: Transport,
    },
    /// The TCP peer is outside the identity's networks.
    #[error("{identity} may not connect from {ip}")]
    Network {
        /// The identity.
        identity: String,
        /// The peer address.
        ip: IpAddr,
    },
    /// The vsock peer is not the VM the identity is bound to.
    #[error(
        "{identity} is bound to {} but connected from CID {actual}",
        expected.map_or_else(|| "a VM with no declared CID".to_owned(), |c| format!("CID {c}"))
    )]
    Cid {
        /// The identity.
        identity: String,
        /// The bound CID (`None` if the bound VM has no CID declared).
        expected: Option<u32>,
        /// The kernel-reported peer CID.
        actual: u32,
    },
    /// The hybrid vsock peer is not the VM the identity is bound to.
    #[error("{identity} is not bound to VM {actual}, whose vsock it connected through")]
    Vm {
        /// The identity.
        identity: String,
        /// The VM the connection came from.
        actual: VmName,
    },
    /// The vsock peer's CID is not on the listener's allow-list (`None`:
    /// a hybrid vsock peer whose VM declares no CID).
    #[error("CID {0:?} may not connect")]
    CidNotAllowed(Option<u32>),
}

impl Policy {
    /// The rule naming `identity`, if any.
    pub fn rule(&self, identity: &str) -> Option<&IdentityRule> {
        self.identities.iter().find(|r| r.name == identity)
    }

    /// Decides a connection (step 1 and 2 of the module docs). `cid_of`
    /// looks up the vsock CID the inventory declares for a VM.
    ///
    /// # Errors
    /// [`Denial`] saying which rule refused the peer.
    pub fn admit(
        &self,
        identity: &PeerIdentity,
        peer: &PeerAddr,
        cid_of: impl Fn(&VmName) -> Option<u32>,
    ) -> Result<Grant, Denial> {
        // The peer's CID: reported by the kernel, or declared for the VM
        // whose hybrid vsock socket the connection came through.
        let peer_cid = match peer {
            PeerAddr::Vsock { cid, .. } => Some(*cid),
            PeerAddr::HybridVsock { vm } => cid_of(vm),
            PeerAddr::Tcp(_) => None,
        };
        if let (PeerAddr::Vsock { .. } | PeerAddr::HybridVsock { .. }, Some(allowed)) =
            (peer, &self.vsock_allowed_cids)
            && !peer_cid.is_some_and(|cid| allowed.contains(&cid))
        {
            return Err(Denial::CidNotAllowed(peer_cid));
        }
        let Some(rule) = self.rule(&identity.name) else {
            return Ok(Grant {
                role: self.default_role,
                visible: Scope::all(),
                change: Scope::none(),
                matched: false,
            });
        };
        let name = || rule.name.clone();
        if let Some(pin) = &rule.spki_sha256
            && !pin.eq_ignore_ascii_case(&identity.spki_sha256)
        {
            return Err(Denial::KeyMismatch { identity: name() });
        }
        let transport = Transport::of(peer);
        if rule
            .transports
            .as_ref()
            .is_some_and(|allowed| !allowed.contains(&transport))
        {
            return Err(Denial::Transport {
                identity: name(),
                transport,
            });
        }
        match peer {
            PeerAddr::Tcp(addr) => {
                if !rule.tcp_networks.is_empty()
                    && !rule.tcp_networks.iter().any(|n| n.contains(addr.ip()))
                {
                    return Err(Denial::Network {
                        identity: name(),
                        ip: addr.ip(),
                    });
                }
            }
            PeerAddr::Vsock { cid, .. } => {
                let expected = match &rule.binding {
                    None => None,
                    Some(Binding::Cid(bound)) => Some(Some(*bound)),
                    Some(Binding::Vm(vm)) => Some(cid_of(vm)),
                };
                if let Some(expected) = expected
                    && expected != Some(*cid)
                {
                    return Err(Denial::Cid {
                        identity: name(),
                        expected,
                        actual: *cid,
                    });
                }
            }
            PeerAddr::HybridVsock { vm } => {
                let bound = match &rule.binding {
                    None => true,
                    Some(Binding::Vm(bound)) => bound == vm,
                    Some(Binding::Cid(bound)) => cid_of(vm) == Some(*bound),
                };
                if !bound {
                    return Err(Denial::Vm {
                        identity: name(),
                        actual: vm.clone(),
                    });
                }
            }
        }
        Ok(Grant {
            role: rule.role,
            visible: rule.visible.clone(),
            change: rule.change.clone(),
            matched: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str) -> VmName {
        VmName::new(name).expect("valid")
    }

    fn id(name: &str, key: &str) -> PeerIdentity {
        PeerIdentity {
            name: name.into(),
            spki_sha256: key.into(),
        }
    }

    fn tcp(addr: &str) -> PeerAddr {
        PeerAddr::Tcp(addr.parse().expect("socket address"))
    }

    fn vsock(cid: u32) -> PeerAddr {
        PeerAddr::Vsock { cid, port: 1234 }
    }

    #[test]
    fn globs() {
        for (p, t, m) in [
            ("*", "gui-vm", true),
            ("gui-vm", "gui-vm", true),
            ("gui-vm", "gui-vm2", false),
            ("app-*", "app-chrome", true),
            ("app-*", "net-vm", false),
            ("*-vm", "net-vm", true),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("*a*b*", "xxaxxbxx", true),
            ("*a*b", "xxaxxbx", false),
            ("", "x", false),
        ] {
            assert_eq!(glob(p.as_bytes(), t.as_bytes()), m, "{p} ~ {t}");
        }
        assert!(Scope::all().contains(&vm("anything")));
        assert!(!Scope::none().contains(&vm("anything")));
        assert!(Scope::of(["gui-vm", "app-*"]).contains(&vm("app-1")));
    }

    #[test]
    fn networks() {
        let net: IpNet = "10.0.0.0/8".parse().expect("valid");
        assert!(net.contains("10.1.2.3".parse().expect("ip")));
        assert!(!net.contains("11.0.0.1".parse().expect("ip")));
        assert!(
            net.contains("::ffff:10.0.0.1".parse().expect("ip")),
            "mapped IPv4"
        );
        let v6: IpNet = "fd00::/8".parse().expect("valid");
        assert!(v6.contains("fd12::1".parse().expect("ip")));
        assert!(!v6.contains("10.0.0.1".parse().expect("ip")));
        let any: IpNet = "0.0.0.0/0".parse().expect("valid");
        assert!(any.contains("1.2.3.4".parse().expect("ip")));
        for bad in ["10.0.0.0", "10.0.0.0/33", "x/8", "::1/129"] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_identities_get_the_default_role() {
        let policy = Policy::default();
        let grant = policy
            .admit(&id("stranger", "k"), &tcp("127.0.0.1:1"), |_| None)
            .expect("admitted");
        assert_eq!(grant.role, None, "default deny");
        assert!(!grant.matched);
        let policy = Policy {
            default_role: Some(Role::Reader),
            ..Policy::default()
        };
        let grant = policy
            .admit(&id("stranger", "k"), &tcp("127.0.0.1:1"), |_| None)
            .expect("admitted");
        assert_eq!(grant.role, Some(Role::Reader));
        assert!(!grant.change.contains(&vm("x")));
    }

    #[test]
    fn pinned_keys_must_match() {
        let mut rule = IdentityRule::new("admin", Some(Role::Admin));
        rule.spki_sha256 = Some("ABCD".into());
        let policy = Policy {
            identities: vec![rule],
            ..Policy::default()
        };
        assert!(
            policy
                .admit(&id("admin", "abcd"), &tcp("127.0.0.1:1"), |_| None)
                .is_ok()
        );
        assert_eq!(
            policy.admit(&id("admin", "ffff"), &tcp("127.0.0.1:1"), |_| None),
            Err(Denial::KeyMismatch {
                identity: "admin".into()
            })
        );
    }

    #[test]
    fn vsock_peers_must_be_the_bound_vm() {
        let mut by_vm = IdentityRule::new("gui-vm", Some(Role::Operator));
        by_vm.binding = Some(Binding::Vm(vm("gui-vm")));
        let mut by_cid = IdentityRule::new("net-vm", Some(Role::Reader));
        by_cid.binding = Some(Binding::Cid(5));
        let policy = Policy {
            identities: vec![by_vm, by_cid],
            vsock_allowed_cids: Some(vec![3, 4, 5]),
            ..Policy::default()
        };
        let cid_of = |name: &VmName| (name.as_str() == "gui-vm").then_some(3);
        assert!(policy.admit(&id("gui-vm", ""), &vsock(3), cid_of).is_ok());
        assert_eq!(
            policy.admit(&id("gui-vm", ""), &vsock(4), cid_of),
            Err(Denial::Cid {
                identity: "gui-vm".into(),
                expected: Some(3),
                actual: 4
            })
        );
        assert!(policy.admit(&id("net-vm", ""), &vsock(5), cid_of).is_ok());
        assert!(policy.admit(&id("net-vm", ""), &vsock(3), cid_of).is_err());
        // A VM without a declared CID cannot satisfy a binding.
        let orphan = Policy {
            identities: vec![{
                let mut r = IdentityRule::new("x", Some(Role::Reader));
                r.binding = Some(Binding::Vm(vm("ghost")));
                r
            }],
            ..Policy::default()
        };
        assert!(orphan.admit(&id("x", ""), &vsock(3), |_| None).is_err());
        // Not on the listener's allow-list, whoever it claims to be.
        assert_eq!(
            policy.admit(&id("stranger", ""), &vsock(9), cid_of),
            Err(Denial::CidNotAllowed(Some(9)))
        );
        // Hybrid vsock peers are bound by the VM they came through.
        let via = |name: &str| PeerAddr::HybridVsock { vm: vm(name) };
        assert!(
            policy
                .admit(&id("gui-vm", ""), &via("gui-vm"), cid_of)
                .is_ok()
        );
        assert_eq!(
            policy.admit(&id("gui-vm", ""), &via("app-vm"), cid_of),
            Err(Denial::CidNotAllowed(None)),
            "app-vm declares no CID: not on the allow-list"
        );
        let unlisted = Policy {
            vsock_allowed_cids: None,
            ..policy.clone()
        };
        assert!(matches!(
            unlisted.admit(&id("gui-vm", ""), &via("app-vm"), cid_of),
            Err(Denial::Vm { .. })
        ));
        // Bindings constrain vsock peers; TCP is governed by transports.
        assert!(
            policy
                .admit(&id("gui-vm", ""), &tcp("127.0.0.1:1"), cid_of)
                .is_ok()
        );
    }

    #[test]
    fn transports_and_networks_restrict_peers() {
        let mut admin = IdentityRule::new("admin", Some(Role::Admin));
        admin.transports = Some(vec![Transport::Tcp]);
        admin.tcp_networks = vec!["10.0.0.0/8".parse().expect("net")];
        let policy = Policy {
            identities: vec![admin],
            ..Policy::default()
        };
        assert!(
            policy
                .admit(&id("admin", ""), &tcp("10.2.3.4:1"), |_| None)
                .is_ok()
        );
        assert!(matches!(
            policy.admit(&id("admin", ""), &tcp("192.0.2.1:1"), |_| None),
            Err(Denial::Network { .. })
        ));
        assert!(matches!(
            policy.admit(&id("admin", ""), &vsock(3), |_| None),
            Err(Denial::Transport {
                transport: Transport::Vsock,
                ..
            })
        ));
    }
}
