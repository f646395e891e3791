"""`python -m extproc.dev.mock`: the mock provider standalone (k8s, `extproc run`)."""

from extproc.dev.mock.server import main

raise SystemExit(main())
