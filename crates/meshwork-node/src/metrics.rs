//! The node's own Prometheus metrics, next to libp2p's (registered in the same registry under
//! the `libp2p_` prefix). Every label set here is drawn from a small fixed vocabulary, so the
//! families stay bounded.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

#[derive(Clone, Default)]
pub struct NodeMetrics {
    pub connections: Family<Labels, Gauge>,
    pub addrbook_entries: Family<Labels, Gauge>,
    pub pex_requests_sent: Counter,
    pub pex_answers: Family<Labels, Counter>,
    pub pex_records_added: Counter,
    pub penalties: Family<Labels, Counter>,
    pub bans: Counter,
    pub dials: Family<Labels, Counter>,
    pub gossip_messages: Family<Labels, Counter>,
    pub chain_height: Gauge,
    pub sync_blocks: Counter,
}

impl NodeMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("meshwork");
        r.register(
            "connections",
            "Open connections by class",
            m.connections.clone(),
        );
        r.register(
            "addrbook_entries",
            "Address book entries by table",
            m.addrbook_entries.clone(),
        );
        r.register(
            "pex_requests_sent",
            "Peer-exchange requests sent",
            m.pex_requests_sent.clone(),
        );
        r.register(
            "pex_answers",
            "Peer-exchange answers received, by outcome",
            m.pex_answers.clone(),
        );
        r.register(
            "pex_records_added",
            "Address book entries added from peer exchange",
            m.pex_records_added.clone(),
        );
        r.register(
            "penalties",
            "Misbehaviour penalties, by offence",
            m.penalties.clone(),
        );
        r.register("bans", "Peers banned for misbehaviour", m.bans.clone());
        r.register("dials", "Dials started, by purpose", m.dials.clone());
        r.register(
            "gossip_messages",
            "Gossip messages validated (first copies only), by topic and verdict",
            m.gossip_messages.clone(),
        );
        r.register(
            "chain_height",
            "Height of the main chain's tip",
            m.chain_height.clone(),
        );
        r.register(
            "sync_blocks",
            "Blocks received through sync",
            m.sync_blocks.clone(),
        );
        m
    }
}

/// The API listener's connection counts (`meshwork_http::serve::Counters`), read at each
/// scrape: `meshwork_api_connections_open` and the `_total` counters of connections accepted,
/// refused (every slot busy), evicted (idle, for a newcomer), timed out, and accept errors.
#[derive(Debug)]
pub struct ApiConnections(pub std::sync::Arc<meshwork_http::serve::Counters>);

impl prometheus_client::collector::Collector for ApiConnections {
    fn encode(
        &self,
        mut enc: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.0;
        let open = ConstGauge::new(c.open.load(Relaxed) as i64);
        open.encode(enc.encode_descriptor(
            "api_connections_open",
            "Connections open to the HTTP API",
            None,
            open.metric_type(),
        )?)?;
        for (name, help, v) in [
            (
                "api_connections_accepted",
                "API connections admitted",
                &c.accepted,
            ),
            (
                "api_connections_refused",
                "API connections refused: every slot had a request in flight",
                &c.refused,
            ),
            (
                "api_connections_evicted",
                "Idle API connections closed to make room for a newcomer",
                &c.evicted,
            ),
            (
                "api_connections_timed_out",
                "API connections closed by the header-read, keep-alive or stall timeout",
                &c.timed_out,
            ),
            (
                "api_accept_errors",
                "Failed accepts on the API listener",
                &c.accept_errors,
            ),
        ] {
            let m = ConstCounter::new(v.load(Relaxed));
            m.encode(enc.encode_descriptor(name, help, None, m.metric_type())?)?;
        }
        Ok(())
    }
}
