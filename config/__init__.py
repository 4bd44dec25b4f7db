"""The project shell: settings, URLs, WSGI, the dashboard and the commands that set up and start the
portal's processes. It sits on top of every app and nothing imports it; the apps below it are
`machines` (machines, projects, consoles, BMCs), `hypervisors` (hosts, drivers, images, networks) and
`portal` (the bottom: audit, accounts, tokens, the queue report, shared helpers)."""
