"""Imported first by the launcher's forkserver (`titan_rl.preload.PRELOADED_MODULES`): puts that
process in a process group of its own.

The forkserver starts in the launcher's group, so a signal to the whole group (`kill -TERM -PGID`,
`timeout`, Ctrl-\\ in a terminal) would kill it too, and with it, through `PR_SET_PDEATHSIG`,
every service at once: the trainer would be cut off in the middle of its ordered stop, and the
launcher, reading the services' exit codes from the forkserver, would see them all fail. Alone in
its group, only the launcher's own signals reach the services, one by one and in order.
"""

import os

os.setpgrp()
