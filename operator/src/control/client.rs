//! Reading an agent's control socket.
use std::path::Path;

use crate::agent::status::AgentStatus;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("GET {path}: HTTP {status}")]
    Status { path: String, status: u16 },
    #[error("reading the agent's answer: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Send GET `path` to the agent's control socket; the response's body streams.
async fn request(
    socket: &Path,
    path: &str,
) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, "moat-agent")
        .body(Empty::<Bytes>::new())
        .expect("static request");
    Ok(sender.send_request(req).await?)
}

/// GET `path` on the agent's control socket; returns the status code and the body.
pub async fn get(socket: &Path, path: &str) -> Result<(u16, Bytes), ClientError> {
    let res = request(socket, path).await?;
    let code = res.status().as_u16();
    let body = res.into_body().collect().await?.to_bytes();
    Ok((code, body))
}

/// GET `path` and hand every line of the (streamed) body to `on_line` as it arrives, until
/// the agent ends the response or `on_line` returns false.
pub async fn get_lines(
    socket: &Path,
    path: &str,
    mut on_line: impl FnMut(&[u8]) -> bool,
) -> Result<(), ClientError> {
    let res = request(socket, path).await?;
    if res.status().as_u16() != 200 {
        return Err(ClientError::Status {
            path: path.to_owned(),
            status: res.status().as_u16(),
        });
    }
    let mut body = res.into_body();
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            buf.extend_from_slice(&data);
            while let Some(i) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                if !on_line(&line[..line.len() - 1]) {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

/// The agent's status.
pub async fn status(socket: &Path) -> Result<AgentStatus, ClientError> {
    let (code, body) = get(socket, "/status").await?;
    if code != 200 {
        return Err(ClientError::Status {
            path: "/status".into(),
            status: code,
        });
    }
    Ok(serde_json::from_slice(&body)?)
}
