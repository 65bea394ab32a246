"""The organisers' harness: team images run under the time limit on staged scans (the
runner), the watchdog that removes a dead run's containers, and the container units of
``./evaluate run --cluster``. The most downstream room: it calls ``tusrec.scoring`` to
judge each scan and ``tusrec.ranking`` to rank the teams."""
