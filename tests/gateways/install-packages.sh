#!/bin/sh
# The Debian packages the suite starts for real, in one apt-get run: a no-op when they are all installed.
# - the gateways of tests/gateways: nginx, caddy, apache2 with libapache2-mod-auth-openidc;
# - pgbouncer, for tests/pooler (which would otherwise install it itself, in a second apt-get run);
# - chromium, which Playwright drives in tests/clients/test_browser.py (it never downloads a browser).
# Run by `make test-deps` as root on a fresh machine. apt must not start the system's nginx, apache2 or
# pgbouncer (the tests run their own on free ports), so a policy-rc.d that forbids starting services is put in
# place for the install when the machine has none, and removed afterwards.
set -eu
PACKAGES="nginx caddy apache2 libapache2-mod-auth-openidc pgbouncer chromium"
missing=""
for package in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing="$missing $package"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "test-deps: missing Debian packages:$missing (run as root: apt-get install -y$missing)" >&2
    exit 1
fi
policy=/usr/sbin/policy-rc.d
added=""
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    added=1
fi
trap 'if [ -n "$added" ]; then rm -f "$policy"; fi' EXIT
apt-get update -qq
# With recommends, as chromium was installed before it joined this list (fonts-liberation, the GL drivers).
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
