"""The follow-up observer's views of the broker's output, above ``broker`` and ``replay``:

``lightcurve``    an event's light curve from Redis, a dataset or an archival file, its
                  causal PSPL fit and the series every view draws (one computation)
``figure``        the matplotlib figure of an event (``ulens events plot``)
``web_figure``    the same series as a Plotly figure (the dashboard's event page)
``trigger_feed``  a background reader of the trigger topic (the dashboard's list)
``dashboard``     ``ulens dashboard``: the local web page
``cli_events``    ``ulens events show | list | plot``

It imports ``broker`` (Redis state, trigger decoding), ``replay`` (archival files) and
``training`` (model, PSPL fit, decision rule); none of them imports it.
"""
