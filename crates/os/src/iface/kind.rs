//! Telling Wi-Fi, cellular and wired links apart.
//!
//! rtnetlink gives the link layer (`ARPHRD_*`) and flags, but a Wi-Fi card
//! and many USB modems (cdc_ether, qmi_wwan) are all `ARPHRD_ETHER` there:
//! only sysfs says which is which, so the facts are gathered from both.

use std::fs;
use std::path::Path;

use super::Kind;

/// What the kernel says about one link, as far as its kind is concerned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct KindFacts {
    /// `IFF_LOOPBACK` is set.
    pub(crate) loopback: bool,
    /// The link layer is `ARPHRD_ETHER`.
    pub(crate) ether: bool,
    /// rtnetlink's `IFLA_INFO_KIND` is `wwan` (a wwan-framework link).
    pub(crate) info_wwan: bool,
    /// `/sys/class/net/NAME/wireless` or `/phy80211` exists.
    pub(crate) sysfs_wireless: bool,
    /// `DEVTYPE=` from `/sys/class/net/NAME/uevent`, if any.
    pub(crate) devtype: Option<String>,
}

impl KindFacts {
    /// Adds what sysfs knows about the link called `name`. Missing files
    /// (another network namespace's sysfs, a link already gone) just leave
    /// the facts from netlink.
    pub(crate) fn read_sysfs(&mut self, name: &str) {
        // A name with a slash or dots cannot be a kernel interface name;
        // refuse it rather than read outside /sys/class/net.
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return;
        }
        let dir = Path::new("/sys/class/net").join(name);
        self.sysfs_wireless = dir.join("wireless").exists() || dir.join("phy80211").exists();
        if let Ok(uevent) = fs::read_to_string(dir.join("uevent")) {
            self.devtype = uevent
                .lines()
                .find_map(|l| l.strip_prefix("DEVTYPE="))
                .map(|d| d.trim().to_owned());
        }
    }
}

/// The kind of a link from its facts and name. Order matters: a modem or a
/// Wi-Fi card usually also has an Ethernet link layer.
pub(crate) fn classify(name: &str, facts: &KindFacts) -> Kind {
    let devtype = facts.devtype.as_deref();
    if facts.loopback {
        Kind::Loopback
    } else if facts.sysfs_wireless || devtype == Some("wlan") {
        Kind::Wifi
    } else if devtype == Some("wwan")
        || facts.info_wwan
        || name.starts_with("wwan")
        // Qualcomm's cellular data links, as on Android and many modules.
        || name.starts_with("rmnet")
    {
        Kind::Cellular
    } else if facts.ether {
        Kind::Ethernet
    } else {
        Kind::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_from_facts() {
        let ether = KindFacts {
            ether: true,
            ..KindFacts::default()
        };
        assert_eq!(classify("eth0", &ether), Kind::Ethernet);
        assert_eq!(classify("veth1", &ether), Kind::Ethernet);
        assert_eq!(
            classify(
                "lo",
                &KindFacts {
                    loopback: true,
                    ..KindFacts::default()
                }
            ),
            Kind::Loopback
        );
        assert_eq!(
            classify(
                "wlp2s0",
                &KindFacts {
                    sysfs_wireless: true,
                    ..ether.clone()
                }
            ),
            Kind::Wifi
        );
        assert_eq!(
            classify(
                "wlan0",
                &KindFacts {
                    devtype: Some("wlan".into()),
                    ..ether.clone()
                }
            ),
            Kind::Wifi
        );
        assert_eq!(
            classify(
                "usb0",
                &KindFacts {
                    devtype: Some("wwan".into()),
                    ..ether.clone()
                }
            ),
            Kind::Cellular
        );
        assert_eq!(classify("wwan0", &KindFacts::default()), Kind::Cellular);
        assert_eq!(
            classify("rmnet_data0", &KindFacts::default()),
            Kind::Cellular
        );
        assert_eq!(
            classify(
                "mhi0",
                &KindFacts {
                    info_wwan: true,
                    ..KindFacts::default()
                }
            ),
            Kind::Cellular
        );
        assert_eq!(classify("wg0", &KindFacts::default()), Kind::Other);
        assert_eq!(
            classify(
                "br0",
                &KindFacts {
                    devtype: Some("bridge".into()),
                    ..ether
                }
            ),
            Kind::Ethernet
        );
    }

    #[test]
    fn sysfs_of_missing_link_changes_nothing() {
        let mut facts = KindFacts {
            ether: true,
            ..KindFacts::default()
        };
        facts.read_sysfs("baton-no-such-link");
        facts.read_sysfs("../../etc");
        assert_eq!(
            facts,
            KindFacts {
                ether: true,
                ..KindFacts::default()
            }
        );
    }
}
