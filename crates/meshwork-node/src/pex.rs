//! The PEX protocol's codec for libp2p request-response: 4-byte big-endian length, then a
//! postcard body (see [`meshwork_proto::pex`] for the messages and limits).
//!
//! Frames longer than [`MAX_MESSAGE_BYTES`] are refused from their length prefix, before any
//! body byte is read or any buffer allocated. Framing and decoding errors surface as
//! `io::ErrorKind::InvalidData`, which the node treats as a protocol violation by the peer.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use meshwork_proto::pex::{PexRequest, PexResponse, MAX_MESSAGE_BYTES};

/// Reads one length-prefixed frame of at most `max` bytes.
pub async fn read_frame<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    max: usize,
) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the limit of {max}"),
        ));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Writes one length-prefixed frame.
pub async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(body).await?;
    io.close().await
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

#[derive(Clone, Default)]
pub struct PexCodec;

impl libp2p::request_response::Codec for PexCodec {
    type Protocol = StreamProtocol;
    type Request = PexRequest;
    type Response = PexResponse;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<PexRequest> {
        PexRequest::decode(&read_frame(io, MAX_MESSAGE_BYTES).await?).map_err(invalid)
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<PexResponse> {
        PexResponse::decode(&read_frame(io, MAX_MESSAGE_BYTES).await?).map_err(invalid)
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: PexRequest,
    ) -> io::Result<()> {
        write_frame(io, &req.encode()).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: PexResponse,
    ) -> io::Result<()> {
        write_frame(io, &res.encode()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;

    #[test]
    fn oversized_frames_are_refused_from_the_prefix() {
        futures::executor::block_on(async {
            let mut bytes = (u32::MAX).to_be_bytes().to_vec();
            bytes.extend_from_slice(&[0; 16]);
            let err = read_frame(&mut Cursor::new(bytes), MAX_MESSAGE_BYTES)
                .await
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);

            let mut out = Cursor::new(Vec::new());
            write_frame(&mut out, b"hello").await.unwrap();
            let back = read_frame(&mut Cursor::new(out.into_inner()), 16)
                .await
                .unwrap();
            assert_eq!(back, b"hello");
        });
    }
}
