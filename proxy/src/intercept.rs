//! Transparent interception: the destination a connection was meant for before iptables
//! REDIRECT sent it to the proxy (`SO_ORIGINAL_DST`, `IP6T_SO_ORIGINAL_DST`).

use std::net::SocketAddr;

use tokio::net::TcpStream;

/// The connection's original destination. A connection that was not redirected (dialled to
/// the proxy's port itself) reports the proxy's own address, as does a kernel without
/// connection tracking for it; `None` only when even the local address is unknown.
pub fn original_destination(stream: &TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    let socket = socket2::SockRef::from(stream);
    let original = match local {
        SocketAddr::V4(_) => socket.original_dst_v4(),
        SocketAddr::V6(_) => socket.original_dst_v6(),
    };
    Some(
        original
            .ok()
            .and_then(|addr| addr.as_socket())
            .map_or(local, canonical),
    )
}

/// IPv4-mapped IPv6 addresses as the IPv4 they are, so that one config entry matches both.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// True when dialling `target` for a connection accepted on `local` would come straight
/// back to the same socket: a connection made to the interception port directly, which
/// passed through, would loop until the proxy runs out of file descriptors.
pub fn loops_back(target: SocketAddr, local: SocketAddr) -> bool {
    target.port() == local.port()
        && (target.ip() == local.ip() || target.ip().is_loopback() || target.ip().is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_that_was_not_redirected_reports_its_own_destination() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert_eq!(original_destination(&accepted), Some(addr));
    }

    #[test]
    fn dialling_the_interception_port_itself_is_a_loop() {
        let local: SocketAddr = "127.0.0.1:15001".parse().unwrap();
        assert!(loops_back(local, local));
        assert!(loops_back("0.0.0.0:15001".parse().unwrap(), local));
        assert!(loops_back(
            "10.0.0.5:15001".parse().unwrap(),
            "10.0.0.5:15001".parse().unwrap()
        ));
        assert!(!loops_back("10.0.0.5:80".parse().unwrap(), local));
        assert!(!loops_back(
            "10.0.0.6:15001".parse().unwrap(),
            "10.0.0.5:15001".parse().unwrap()
        ));
        assert_eq!(
            canonical("[::ffff:10.1.2.3]:80".parse().unwrap()),
            "10.1.2.3:80".parse::<SocketAddr>().unwrap()
        );
    }
}
