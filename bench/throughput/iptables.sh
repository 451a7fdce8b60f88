#!/usr/bin/env bash
# iptables baseline of `make bench-throughput`: prints an iptables-restore file for the lab's
# node namespace (iptables with the nf_tables backend, as Debian ships it).
#
#   iptables.sh PEERS_FILE CLIENT SERVER | ip netns exec NODE iptables-restore
#
# PEERS_FILE holds the 10,000 other peers, one address a line (the addresses moat's policy
# entries and the nftables set name). Each becomes one rule in FORWARD, in order, so every
# packet walks all of them before the rules that accept the benchmark's flow (the way
# per-peer iptables rules grow without sets). Stateless like the nftables baseline: replies
# are accepted by their source port.
set -euo pipefail
peers=$1 client=$2 server=$3
echo '*filter'
echo ':INPUT ACCEPT [0:0]'
echo ':FORWARD DROP [0:0]'
echo ':OUTPUT ACCEPT [0:0]'
while read -r peer; do
  echo "-A FORWARD -s $peer/32 -d $server/32 -p tcp -m multiport --dports 80,5201 -j ACCEPT"
done <"$peers"
echo "-A FORWARD -s $client/32 -d $server/32 -p tcp -m multiport --dports 80,5201 -j ACCEPT"
echo "-A FORWARD -s $client/32 -d $server/32 -p udp -m udp --dport 5201 -j ACCEPT"
echo "-A FORWARD -s $server/32 -d $client/32 -p tcp -m multiport --sports 80,5201 -j ACCEPT"
echo "-A FORWARD -s $server/32 -d $client/32 -p udp -m udp --sport 5201 -j ACCEPT"
echo 'COMMIT'
