//! The decision engine's configuration: the `[policy]` table of the client
//! agent's file.
//!
//! Every key has a default, so an absent table gives a working engine: with
//! no interface attributes at all, preference follows the kernel's route
//! metrics. Unknown keys are errors (a typo must not silently fall back to a
//! default). Durations are humantime strings (`"500ms"`, `"30s"`, `"5m"`), as
//! everywhere else in baton's configuration.
//!
//! ```toml
//! [policy]
//! mode = "auto"                       # auto | manual | user
//! check_interval = "500ms"
//! search_interval = "2s"
//! address_interval = "3s"             # a multihomed gateway's other addresses
//! warning = { rtt = "300ms", loss = 0.05 }
//! critical = { rtt = "1s", loss = 0.2, stall = "2s" }
//! hysteresis = 0.15
//! min_dwell = "30s"
//! weights = { rtt = 1.0, loss = 10.0, cost = 20.0 }
//!
//! [policy.kinds.cellular]
//! metered = true
//!
//! [policy.interfaces.hotspot0]
//! needs_user_interaction = true
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{de, Deserialize, Deserializer, Serialize};

/// How far the engine may act on its own. Whatever the mode, a path past a
/// critical threshold or lost is replaced at once (the seed's Check Activity
/// "in order to avoid any interruption of service"), and a user's explicit
/// request is honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Switch without asking when a better path exists (`"auto"`, the
    /// default).
    #[default]
    Auto,
    /// Propose a better path and wait for approve or decline (`"manual"`,
    /// the seed's semi-automatic mode).
    Manual,
    /// Never propose; only report degradation. The path moves only when the
    /// user asks (`baton switch`) or past a critical threshold (`"user"`).
    User,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Auto => "auto",
            Mode::Manual => "manual",
            Mode::User => "user",
        })
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Mode::Auto),
            "manual" => Ok(Mode::Manual),
            "user" => Ok(Mode::User),
            _ => Err(format!("unknown mode {s:?}: expected auto, manual or user")),
        }
    }
}

/// What kind of link an interface is. Per-kind attributes
/// (`[policy.kinds.cellular]`) are keyed on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Wired Ethernet and other Ethernet-like links (veth, bridges, VM NICs).
    Ethernet,
    /// A wireless LAN.
    Wifi,
    /// A cellular modem.
    Cellular,
    /// Tunnels, PPP, loopback and everything else.
    Other,
}

/// Limits on one level (warning or critical) of path quality. `None` means
/// the metric is not checked at that level (`"off"` in the file).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Mean round trip over the window at or above which the level is
    /// reached.
    pub rtt: Option<Duration>,
    /// Fraction of probes lost over the window (0 to 1).
    pub loss: Option<f64>,
    /// Mean difference between consecutive round trips.
    pub jitter: Option<Duration>,
    /// Time the current path has held data without progress.
    pub stall: Option<Duration>,
    /// Throughput of the current path, in bytes per second, at or *below*
    /// which the level is reached. The driver reports throughput only over
    /// intervals when the application had data waiting, so an idle path is
    /// never judged slow.
    pub throughput: Option<u64>,
}

impl Thresholds {
    /// Defaults of `warning`: rtt 300ms, loss 0.05, stall 1s; jitter and
    /// throughput off.
    pub fn default_warning() -> Self {
        Self {
            rtt: Some(Duration::from_millis(300)),
            loss: Some(0.05),
            jitter: None,
            stall: Some(Duration::from_secs(1)),
            throughput: None,
        }
    }

    /// Defaults of `critical`: rtt 1s, loss 0.2, stall 2s; jitter and
    /// throughput off.
    pub fn default_critical() -> Self {
        Self {
            rtt: Some(Duration::from_secs(1)),
            loss: Some(0.2),
            jitter: None,
            stall: Some(Duration::from_secs(2)),
            throughput: None,
        }
    }
}

/// How much each quantity weighs in an interface's score. The score is a
/// penalty: lower is better. One point is roughly one millisecond of round
/// trip, so the defaults read as "1% loss hurts like 10ms, one unit of cost
/// like 20ms".
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Weights {
    /// Points per millisecond of mean round trip. Default 1.0.
    #[serde(default = "defaults::w_rtt", deserialize_with = "non_negative")]
    pub rtt: f64,
    /// Points per millisecond of jitter. Default 0.5.
    #[serde(default = "defaults::w_jitter", deserialize_with = "non_negative")]
    pub jitter: f64,
    /// Points per percentage point of loss. Default 10.0.
    #[serde(default = "defaults::w_loss", deserialize_with = "non_negative")]
    pub loss: f64,
    /// Points per unit of the interface's `cost`. Default 20.0.
    #[serde(default = "defaults::w_cost", deserialize_with = "non_negative")]
    pub cost: f64,
    /// Points added to a metered interface. Default 50.0.
    #[serde(default = "defaults::w_metered", deserialize_with = "non_negative")]
    pub metered: f64,
    /// Points per place in the order of preference (user `priority`, then
    /// the kernel's route metric), so that between equal links the
    /// preferred one wins. Default 15.0: more than the default `min_gain`,
    /// so that the agent goes back to the preferred link once it is as good
    /// again.
    #[serde(default = "defaults::w_preference", deserialize_with = "non_negative")]
    pub preference: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Self {
            rtt: defaults::w_rtt(),
            jitter: defaults::w_jitter(),
            loss: defaults::w_loss(),
            cost: defaults::w_cost(),
            metered: defaults::w_metered(),
            preference: defaults::w_preference(),
        }
    }
}

/// User attributes of an interface or of a kind of interface, as written in
/// the file; an absent key leaves the value to the next layer (interface
/// over kind over default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceRule {
    /// Relative cost of sending over it (any unit, 0 = free). Default 0.
    #[serde(default, deserialize_with = "opt_non_negative")]
    pub cost: Option<f64>,
    /// Explicit preference, lower first; it ranks before the kernel's
    /// route metric. Default none.
    pub priority: Option<u32>,
    /// A metered link (pay per byte, data cap): used only while no
    /// unmetered link is good. Default false.
    pub metered: Option<bool>,
    /// Never switch to it, not even when asked. Default false.
    pub never_use: Option<bool>,
    /// Connecting needs the user (captive portal, dial-up): chosen last when
    /// the engine switches on its own. Default false.
    pub needs_user_interaction: Option<bool>,
}

/// The attributes the engine applies to one interface, after layering
/// `[policy.interfaces.NAME]` over `[policy.kinds.KIND]` over the defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Attributes {
    /// Relative cost, 0 = free.
    pub cost: f64,
    /// Explicit preference, lower first.
    pub priority: Option<u32>,
    /// Pay per byte or capped.
    pub metered: bool,
    /// Excluded from every switch.
    pub never_use: bool,
    /// Connecting needs the user.
    pub needs_user_interaction: bool,
}

/// The decision engine's configuration (`[policy]`). See the module
/// documentation for an example.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// `"auto"`, `"manual"` or `"user"`; can be changed at run time
    /// (`baton mode`). Default `"auto"`.
    #[serde(default)]
    pub mode: Mode,
    /// Period Y of the Check Activity: the current path is probed and
    /// judged this often. Default 500ms.
    #[serde(default = "defaults::check_interval", deserialize_with = "interval")]
    pub check_interval: Duration,
    /// Period X of the Search Activity: the other interfaces are probed and
    /// compared this often (every check interval while the current path is
    /// past a warning threshold). Also the retry period when no path works.
    /// Default 2s.
    #[serde(default = "defaults::search_interval", deserialize_with = "interval")]
    pub search_interval: Duration,
    /// With a multihomed gateway: how often the gateway's other addresses
    /// are probed, on every usable interface (every check interval while
    /// the current path is past a warning threshold). The current address
    /// is probed by the Check and Search activities. At most
    /// [`crate::engine::MAX_TARGETS`] other addresses are measured.
    /// Default 3s.
    #[serde(default = "defaults::address_interval", deserialize_with = "interval")]
    pub address_interval: Duration,
    /// How far back round trip, loss and jitter are averaged. Default 10s.
    #[serde(default = "defaults::window", deserialize_with = "interval")]
    pub window: Duration,
    /// Probes needed in the window before an interface's round trip, loss
    /// and jitter are judged, so that one lost probe is not 100% loss.
    /// Default 3.
    #[serde(default = "defaults::min_samples", deserialize_with = "at_least_one")]
    pub min_samples: u32,
    /// Reaching any of these starts the search for another path (and, in
    /// manual mode, a proposal). Keys as in `critical`; missing keys keep
    /// their defaults, `"off"` disables one. Default
    /// `{ rtt = "300ms", loss = 0.05, stall = "1s" }`.
    #[serde(default = "Thresholds::default_warning", deserialize_with = "warning")]
    pub warning: Thresholds,
    /// Reaching any of these switches at once, in every mode, to the best
    /// other interface, preferring those that connect without the user.
    /// Keys `rtt`, `loss`, `jitter`, `stall` (durations or fractions),
    /// `throughput` (bytes/s, lower is worse). Default
    /// `{ rtt = "1s", loss = 0.2, stall = "2s" }`.
    #[serde(
        default = "Thresholds::default_critical",
        deserialize_with = "critical"
    )]
    pub critical: Thresholds,
    /// Against flapping, as a fraction (0 to <1): a level is left only when
    /// every metric is this much better than its limit, and a better
    /// interface must beat the current score by this fraction (and by
    /// `min_gain`). Default 0.15.
    #[serde(default = "defaults::hysteresis", deserialize_with = "fraction")]
    pub hysteresis: f64,
    /// Smallest score improvement worth a switch, in points (about
    /// milliseconds), so that two fast links differing by a fraction of a
    /// millisecond do not trade places. Default 10.
    #[serde(default = "defaults::min_gain", deserialize_with = "non_negative")]
    pub min_gain: f64,
    /// After any switch, no switch that is not urgent (critical, path lost,
    /// user request) happens for this long; a declined proposal is not
    /// repeated for this long. `"0s"` disables it. Default 30s.
    #[serde(default = "defaults::min_dwell", deserialize_with = "duration")]
    pub min_dwell: Duration,
    /// Score weights (`[policy.weights]`).
    #[serde(default)]
    pub weights: Weights,
    /// Attributes by kind (`[policy.kinds.cellular]`).
    #[serde(default)]
    pub kinds: BTreeMap<Kind, InterfaceRule>,
    /// Attributes by interface name (`[policy.interfaces.wlan0]`); they win
    /// over the kind's.
    #[serde(default)]
    pub interfaces: BTreeMap<String, InterfaceRule>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            mode: Mode::default(),
            check_interval: defaults::check_interval(),
            search_interval: defaults::search_interval(),
            address_interval: defaults::address_interval(),
            window: defaults::window(),
            min_samples: defaults::min_samples(),
            warning: Thresholds::default_warning(),
            critical: Thresholds::default_critical(),
            hysteresis: defaults::hysteresis(),
            min_gain: defaults::min_gain(),
            min_dwell: defaults::min_dwell(),
            weights: Weights::default(),
            kinds: BTreeMap::new(),
            interfaces: BTreeMap::new(),
        }
    }
}

/// A configuration whose keys are each valid but contradict one another.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A warning limit is worse than the critical one, so the warning could
    /// never come first; usually the two tables were swapped.
    #[error("warning.{metric} must be below critical.{metric} (above it, for throughput)")]
    Inverted {
        /// The key, e.g. `rtt`.
        metric: &'static str,
    },
}

impl PolicyConfig {
    /// Checks what single keys cannot: that each warning limit comes before
    /// its critical limit. The driver calls it when loading the file.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let (w, c) = (&self.warning, &self.critical);
        let inverted = |metric| Err(ConfigError::Inverted { metric });
        if matches!((w.rtt, c.rtt), (Some(w), Some(c)) if w > c) {
            return inverted("rtt");
        }
        if matches!((w.loss, c.loss), (Some(w), Some(c)) if w > c) {
            return inverted("loss");
        }
        if matches!((w.jitter, c.jitter), (Some(w), Some(c)) if w > c) {
            return inverted("jitter");
        }
        if matches!((w.stall, c.stall), (Some(w), Some(c)) if w > c) {
            return inverted("stall");
        }
        if matches!((w.throughput, c.throughput), (Some(w), Some(c)) if w < c) {
            return inverted("throughput");
        }
        Ok(())
    }

    /// The attributes of interface `name` of kind `kind`: its own table
    /// over its kind's over the defaults.
    pub fn attributes(&self, name: &str, kind: Kind) -> Attributes {
        let mut a = Attributes::default();
        for rule in [self.kinds.get(&kind), self.interfaces.get(name)]
            .into_iter()
            .flatten()
        {
            a.cost = rule.cost.unwrap_or(a.cost);
            a.priority = rule.priority.or(a.priority);
            a.metered = rule.metered.unwrap_or(a.metered);
            a.never_use = rule.never_use.unwrap_or(a.never_use);
            a.needs_user_interaction = rule
                .needs_user_interaction
                .unwrap_or(a.needs_user_interaction);
        }
        a
    }
}

mod defaults {
    use std::time::Duration;
    pub(super) fn check_interval() -> Duration {
        Duration::from_millis(500)
    }
    pub(super) fn search_interval() -> Duration {
        Duration::from_secs(2)
    }
    pub(super) fn address_interval() -> Duration {
        Duration::from_secs(3)
    }
    pub(super) fn window() -> Duration {
        Duration::from_secs(10)
    }
    pub(super) fn min_samples() -> u32 {
        3
    }
    pub(super) fn hysteresis() -> f64 {
        0.15
    }
    pub(super) fn min_gain() -> f64 {
        10.0
    }
    pub(super) fn min_dwell() -> Duration {
        Duration::from_secs(30)
    }
    pub(super) fn w_rtt() -> f64 {
        1.0
    }
    pub(super) fn w_jitter() -> f64 {
        0.5
    }
    pub(super) fn w_loss() -> f64 {
        10.0
    }
    pub(super) fn w_cost() -> f64 {
        20.0
    }
    pub(super) fn w_metered() -> f64 {
        50.0
    }
    pub(super) fn w_preference() -> f64 {
        15.0
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration {s:?}: {e} (e.g. \"500ms\", \"30s\")"))
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    parse_duration(&String::deserialize(d)?).map_err(de::Error::custom)
}

/// A period: zero would make the driver spin.
fn interval<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let v = duration(d)?;
    if v.is_zero() {
        return Err(de::Error::custom("duration must be greater than zero"));
    }
    Ok(v)
}

fn at_least_one<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = u32::deserialize(d)?;
    if v == 0 {
        return Err(de::Error::custom("must be at least 1"));
    }
    Ok(v)
}

fn non_negative<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let v = f64::deserialize(d)?;
    if !v.is_finite() || v < 0.0 {
        return Err(de::Error::custom(format!(
            "{v} must be a number of zero or more"
        )));
    }
    Ok(v)
}

fn opt_non_negative<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    non_negative(d).map(Some)
}

fn fraction<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let v = f64::deserialize(d)?;
    if !(0.0..1.0).contains(&v) {
        return Err(de::Error::custom(format!(
            "{v} must be at least 0 and below 1"
        )));
    }
    Ok(v)
}

/// A limit as written: a value, or `"off"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Written<T> {
    Value(T),
    Text(String),
}

/// `Some(None)` for `"off"`; the outer `None` (key absent) comes from
/// `#[serde(default)]` and keeps the level's default.
fn limit_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<Duration>>, D::Error> {
    let s = String::deserialize(d)?;
    if s == "off" {
        return Ok(Some(None));
    }
    let v = parse_duration(&s).map_err(de::Error::custom)?;
    if v.is_zero() {
        return Err(de::Error::custom(
            "a limit must be greater than zero (or \"off\")",
        ));
    }
    Ok(Some(Some(v)))
}

fn limit_loss<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<f64>>, D::Error> {
    match Written::<f64>::deserialize(d)? {
        Written::Text(s) if s == "off" => Ok(Some(None)),
        Written::Value(v) if v > 0.0 && v <= 1.0 => Ok(Some(Some(v))),
        Written::Value(v) => Err(de::Error::custom(format!(
            "loss {v} must be above 0 and at most 1 (or \"off\")"
        ))),
        Written::Text(s) => Err(de::Error::custom(format!(
            "invalid loss {s:?}: expected a fraction such as 0.05, or \"off\""
        ))),
    }
}

fn limit_rate<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<u64>>, D::Error> {
    match Written::<u64>::deserialize(d)? {
        Written::Text(s) if s == "off" => Ok(Some(None)),
        Written::Value(v) if v > 0 => Ok(Some(Some(v))),
        Written::Value(_) => Err(de::Error::custom(
            "throughput must be greater than zero (or \"off\")",
        )),
        Written::Text(s) => Err(de::Error::custom(format!(
            "invalid throughput {s:?}: expected bytes per second such as 100000, or \"off\""
        ))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ThresholdsDe {
    #[serde(default, deserialize_with = "limit_duration")]
    rtt: Option<Option<Duration>>,
    #[serde(default, deserialize_with = "limit_loss")]
    loss: Option<Option<f64>>,
    #[serde(default, deserialize_with = "limit_duration")]
    jitter: Option<Option<Duration>>,
    #[serde(default, deserialize_with = "limit_duration")]
    stall: Option<Option<Duration>>,
    #[serde(default, deserialize_with = "limit_rate")]
    throughput: Option<Option<u64>>,
}

impl ThresholdsDe {
    /// Written keys over `base`: `warning = { rtt = "200ms" }` changes the
    /// round trip limit only, not the loss one.
    fn over(self, base: Thresholds) -> Thresholds {
        Thresholds {
            rtt: self.rtt.unwrap_or(base.rtt),
            loss: self.loss.unwrap_or(base.loss),
            jitter: self.jitter.unwrap_or(base.jitter),
            stall: self.stall.unwrap_or(base.stall),
            throughput: self.throughput.unwrap_or(base.throughput),
        }
    }
}

fn warning<'de, D: Deserializer<'de>>(d: D) -> Result<Thresholds, D::Error> {
    Ok(ThresholdsDe::deserialize(d)?.over(Thresholds::default_warning()))
}

fn critical<'de, D: Deserializer<'de>>(d: D) -> Result<Thresholds, D::Error> {
    Ok(ThresholdsDe::deserialize(d)?.over(Thresholds::default_critical()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        policy: PolicyConfig,
    }

    fn parse(text: &str) -> Result<PolicyConfig, String> {
        toml::from_str::<File>(text)
            .map(|f| f.policy)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn empty_table_is_the_documented_defaults() {
        let c = parse("[policy]").unwrap();
        assert_eq!(c, PolicyConfig::default());
        assert_eq!(c.mode, Mode::Auto);
        assert_eq!(c.check_interval, Duration::from_millis(500));
        assert_eq!(c.search_interval, Duration::from_secs(2));
        assert_eq!(c.window, Duration::from_secs(10));
        assert_eq!(c.min_samples, 3);
        assert_eq!(c.warning.rtt, Some(Duration::from_millis(300)));
        assert_eq!(c.warning.loss, Some(0.05));
        assert_eq!(c.warning.stall, Some(Duration::from_secs(1)));
        assert_eq!(c.critical.rtt, Some(Duration::from_secs(1)));
        assert_eq!(c.critical.loss, Some(0.2));
        assert_eq!(c.critical.stall, Some(Duration::from_secs(2)));
        assert_eq!((c.warning.jitter, c.critical.throughput), (None, None));
        assert_eq!(c.hysteresis, 0.15);
        assert_eq!(c.min_gain, 10.0);
        assert_eq!(c.min_dwell, Duration::from_secs(30));
        assert_eq!(
            c.weights,
            Weights {
                rtt: 1.0,
                jitter: 0.5,
                loss: 10.0,
                cost: 20.0,
                metered: 50.0,
                preference: 15.0
            }
        );
        c.validate().unwrap();
    }

    #[test]
    fn full_example_parses() {
        let c = parse(
            r#"
            [policy]
            mode = "manual"
            check_interval = "250ms"
            search_interval = "5s"
            window = "20s"
            min_samples = 5
            warning = { rtt = "200ms", loss = 0.02, jitter = "50ms", throughput = 100000 }
            critical = { rtt = "800ms", loss = 0.3, stall = "3s", throughput = 10000 }
            hysteresis = 0.2
            min_gain = 5
            min_dwell = "1m"
            weights = { rtt = 2.0, loss = 5, cost = 30.0, metered = 100.0, preference = 1.0, jitter = 0 }

            [policy.kinds.cellular]
            metered = true
            cost = 2

            [policy.interfaces.wwan1]
            metered = false

            [policy.interfaces.hotspot0]
            needs_user_interaction = true
            priority = 7

            [policy.interfaces.ppp0]
            never_use = true
            "#,
        )
        .unwrap();
        assert_eq!(c.mode, Mode::Manual);
        assert_eq!(c.check_interval, Duration::from_millis(250));
        assert_eq!(c.min_samples, 5);
        assert_eq!(c.warning.jitter, Some(Duration::from_millis(50)));
        assert_eq!(c.warning.throughput, Some(100_000));
        // A key not written keeps the level's default.
        assert_eq!(c.warning.stall, Some(Duration::from_secs(1)));
        assert_eq!(c.critical.stall, Some(Duration::from_secs(3)));
        assert_eq!(c.min_dwell, Duration::from_secs(60));
        assert_eq!(c.weights.loss, 5.0);
        c.validate().unwrap();

        // Interface over kind over default.
        let wwan0 = c.attributes("wwan0", Kind::Cellular);
        assert!(wwan0.metered);
        assert_eq!(wwan0.cost, 2.0);
        let wwan1 = c.attributes("wwan1", Kind::Cellular);
        assert!(!wwan1.metered);
        assert_eq!(wwan1.cost, 2.0);
        let hot = c.attributes("hotspot0", Kind::Wifi);
        assert!(hot.needs_user_interaction);
        assert_eq!(hot.priority, Some(7));
        assert!(c.attributes("ppp0", Kind::Other).never_use);
        assert_eq!(c.attributes("eth0", Kind::Ethernet), Attributes::default());
    }

    #[test]
    fn off_disables_a_limit() {
        let c = parse(
            r#"policy = { warning = { rtt = "off", loss = "off" }, critical = { stall = "off" } }"#,
        )
        .unwrap();
        assert_eq!((c.warning.rtt, c.warning.loss), (None, None));
        assert_eq!(c.warning.stall, Some(Duration::from_secs(1)));
        assert_eq!(c.critical.stall, None);
        assert_eq!(c.critical.rtt, Some(Duration::from_secs(1)));
    }

    #[test]
    fn bad_values_are_refused_with_the_reason() {
        let cases = [
            ("[policy]\nmodee = \"auto\"", "unknown field `modee`"),
            (
                "[policy]\nmode = \"sometimes\"",
                "unknown variant `sometimes`",
            ),
            (
                "[policy]\ncheck_interval = \"soon\"",
                "invalid duration \"soon\"",
            ),
            ("[policy]\ncheck_interval = \"0s\"", "greater than zero"),
            ("[policy]\nhysteresis = 1.5", "below 1"),
            ("[policy]\nmin_samples = 0", "at least 1"),
            ("[policy]\nwarning = { loss = 5 }", "at most 1"),
            ("[policy]\nwarning = { rtt = \"0ms\" }", "greater than zero"),
            (
                "[policy]\nwarning = { latency = \"1s\" }",
                "unknown field `latency`",
            ),
            ("[policy]\nweights = { rtt = -1 }", "zero or more"),
            (
                "[policy.kinds.satellite]\nmetered = true",
                "unknown variant `satellite`",
            ),
            (
                "[policy.interfaces.eth0]\nprice = 1",
                "unknown field `price`",
            ),
        ];
        for (text, want) in cases {
            let err = parse(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn inverted_limits_are_caught() {
        let c = parse("[policy]\nwarning = { rtt = \"2s\" }").unwrap();
        assert_eq!(c.validate(), Err(ConfigError::Inverted { metric: "rtt" }));
        let c = parse("[policy]\nwarning = { throughput = 10 }\ncritical = { throughput = 100 }")
            .unwrap();
        assert_eq!(
            c.validate(),
            Err(ConfigError::Inverted {
                metric: "throughput"
            })
        );
    }

    #[test]
    fn mode_round_trips_through_text() {
        for m in [Mode::Auto, Mode::Manual, Mode::User] {
            assert_eq!(m.to_string().parse::<Mode>(), Ok(m));
        }
        assert!("automatic".parse::<Mode>().is_err());
    }
}
