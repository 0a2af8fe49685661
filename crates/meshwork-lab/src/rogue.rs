//! Rogue peers: minimal libp2p nodes that speak a network's identify and PEX protocols but
//! answer PEX with whatever a test tells them to, including bytes no honest node would send,
//! and send PEX requests as fast as a test tells them to. The tests of the eclipse flood, of
//! malformed answers, of PEX floods and of another network's peers use them against a real node.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::{AsyncRead, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::identity::Keypair;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identify, Multiaddr, PeerId, StreamProtocol};
use meshwork_node::pex::{read_frame, write_frame};
use meshwork_proto::NetworkName;
use tokio::sync::{mpsc, oneshot, watch};

/// What a rogue writes as its PEX answer.
#[derive(Clone, Debug)]
pub enum RawAnswer {
    /// A correctly framed body (which may hold anything).
    Body(Vec<u8>),
    /// A length prefix announcing `n` bytes, followed by up to 64 KiB of them.
    Oversized(u32),
}

#[derive(Clone, Default)]
struct RawCodec;

impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = RawAnswer;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        read_frame(io, 1 << 20).await
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<RawAnswer> {
        read_frame(io, 1 << 20).await.map(RawAnswer::Body)
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()> {
        write_frame(io, &req).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: RawAnswer,
    ) -> io::Result<()> {
        match res {
            RawAnswer::Body(b) => write_frame(io, &b).await,
            RawAnswer::Oversized(n) => {
                io.write_all(&n.to_be_bytes()).await?;
                let junk = vec![0u8; (n as usize).min(64 * 1024)];
                // The receiver is expected to hang up after the prefix; that error is fine.
                let _ = io.write_all(&junk).await;
                let _ = io.close().await;
                Ok(())
            }
        }
    }
}

#[derive(NetworkBehaviour)]
struct RogueBehaviour {
    identify: identify::Behaviour,
    pex: request_response::Behaviour<RawCodec>,
}

/// What a test can make a running rogue do.
enum Command {
    /// Sends one PEX request (`bytes`, framed) to `peer`.
    PexRequest(PeerId, Vec<u8>),
}

/// What a rogue has seen so far, as counters a test waits on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// Connections open now.
    pub connections: usize,
    /// Connections that closed.
    pub closed: usize,
    /// Answers received to the rogue's own PEX requests.
    pub pex_answers: usize,
    /// PEX requests of the rogue that failed (refused, reset, timed out).
    pub pex_failures: usize,
}

/// Produces the answer to each PEX request the rogue receives.
pub type Answerer = Arc<dyn Fn() -> RawAnswer + Send + Sync>;

/// A running rogue peer.
pub struct Rogue {
    pub peer_id: PeerId,
    pub listen_addr: Multiaddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    commands: mpsc::Sender<Command>,
    seen: watch::Receiver<Seen>,
}

impl Rogue {
    /// Starts a rogue with key `keypair` listening on `ip` for `network`; it dials `targets`
    /// and answers every PEX request with `answer()`.
    pub async fn spawn(
        network: &NetworkName,
        keypair: Keypair,
        ip: std::net::Ipv4Addr,
        targets: Vec<Multiaddr>,
        answer: Answerer,
    ) -> Result<Self> {
        let pex = StreamProtocol::try_from_owned(network.protocol("pex", 1))?;
        let version = network.identify_version();
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            // Dial from our own IP, as nodes do, so that the victim sees the rogue's address.
            .with_other_transport(|key| {
                meshwork_node::transport::tcp_noise_yamux(key, Some(ip.into()))
            })?
            .with_behaviour(|key| RogueBehaviour {
                identify: identify::Behaviour::new(identify::Config::new(version, key.public())),
                pex: request_response::Behaviour::with_codec(
                    RawCodec,
                    [(pex, ProtocolSupport::Full)],
                    request_response::Config::default(),
                ),
            })?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
            .build();
        swarm.listen_on(format!("/ip4/{ip}/tcp/0").parse()?)?;
        let listen_addr = loop {
            if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                break address;
            }
        };
        for t in targets {
            swarm.dial(t).context("rogue dial")?;
        }
        let peer_id = *swarm.local_peer_id();
        let (stop, mut stopped) = oneshot::channel();
        // A test sends a handful of commands at a time; 64 is room enough.
        let (commands, mut command_rx) = mpsc::channel::<Command>(64);
        let (seen_tx, seen) = watch::channel(Seen::default());
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    Some(c) = command_rx.recv() => match c {
                        Command::PexRequest(peer, bytes) => {
                            swarm.behaviour_mut().pex.send_request(&peer, bytes);
                        }
                    },
                    ev = swarm.select_next_some() => match ev {
                        SwarmEvent::Behaviour(RogueBehaviourEvent::Pex(ev)) => match ev {
                            request_response::Event::Message {
                                message: request_response::Message::Request { channel, .. },
                                ..
                            } => {
                                let _ = swarm.behaviour_mut().pex.send_response(channel, answer());
                            }
                            request_response::Event::Message {
                                message: request_response::Message::Response { .. },
                                ..
                            } => seen_tx.send_modify(|s| s.pex_answers += 1),
                            request_response::Event::OutboundFailure { .. } => {
                                seen_tx.send_modify(|s| s.pex_failures += 1)
                            }
                            _ => {}
                        },
                        SwarmEvent::ConnectionEstablished { .. } => {
                            seen_tx.send_modify(|s| s.connections += 1)
                        }
                        SwarmEvent::ConnectionClosed { .. } => seen_tx.send_modify(|s| {
                            s.connections = s.connections.saturating_sub(1);
                            s.closed += 1;
                        }),
                        _ => {}
                    },
                }
            }
        });
        Ok(Self {
            peer_id,
            listen_addr,
            stop: Some(stop),
            task,
            commands,
            seen,
        })
    }

    /// What the rogue has seen so far.
    pub fn seen(&self) -> Seen {
        *self.seen.borrow()
    }

    /// Waits until `what` holds of what the rogue has seen, for at most `timeout`.
    ///
    /// # Errors
    /// When `timeout` passes first, with the last counters in the message.
    pub async fn wait_until(
        &mut self,
        timeout: Duration,
        what: impl Fn(&Seen) -> bool,
    ) -> Result<Seen> {
        let r = tokio::time::timeout(timeout, self.seen.wait_for(|s| what(s)))
            .await
            .map(|r| r.map(|s| *s));
        match r {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(_)) => anyhow::bail!("the rogue stopped"),
            Err(_) => anyhow::bail!("timed out; the rogue saw {:?}", self.seen()),
        }
    }

    /// Sends a PEX request asking `peer` for `max` records.
    ///
    /// # Errors
    /// When the rogue has stopped.
    pub async fn request_pex(&self, peer: PeerId, max: u8) -> Result<()> {
        let bytes = meshwork_proto::pex::PexRequest { max }.encode();
        self.commands
            .send(Command::PexRequest(peer, bytes))
            .await
            .map_err(|_| anyhow::anyhow!("the rogue stopped"))
    }

    pub fn dial_addr(&self) -> Multiaddr {
        self.listen_addr
            .clone()
            .with(libp2p::multiaddr::Protocol::P2p(self.peer_id))
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// A PEX answer body (postcard) holding exactly these wire records, valid or not.
pub fn encode_records(records: Vec<meshwork_proto::pex::WireRecord>) -> Vec<u8> {
    meshwork_proto::pex::PexResponse { records }.encode()
}

/// An answerer that always gives the same answer.
pub fn constant(answer: RawAnswer) -> Answerer {
    Arc::new(move || answer.clone())
}
