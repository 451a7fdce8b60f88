//! The node's uplink when none is configured: the interface of the IPv4 default route, as
//! `ip route show default` would name it, in the agent's network namespace.
use std::net::Ipv4Addr;

use futures::TryStreamExt as _;
use rtnetlink::{
    RouteMessageBuilder,
    packet_route::route::{RouteAttribute, RouteHeader},
};

/// The default route's output interface in the main table, if there is one.
pub async fn default_route_interface() -> Option<String> {
    let (conn, handle, _) = rtnetlink::new_connection().ok()?;
    let task = tokio::spawn(conn);
    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    let mut found = None;
    while let Ok(Some(r)) = routes.try_next().await {
        if r.header.destination_prefix_length != 0 || r.header.table != RouteHeader::RT_TABLE_MAIN {
            continue;
        }
        let oif = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        if let Some(name) = oif.and_then(|i| nix::net::if_::if_indextoname(i).ok()) {
            found = Some(name.to_string_lossy().into_owned());
            break;
        }
    }
    task.abort();
    found
}
