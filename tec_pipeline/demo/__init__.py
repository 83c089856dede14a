"""The built-in demo: its set-up, its data set, its evaluation and what its report says.

``settings`` holds the demo's configs, shipped base and data settings (the TEC and control
configs of one run); ``data`` renders the demo digits (an ImageFolder split by source digit, with
a groups file per split); ``evaluation`` scores models on them as the demo does; ``report`` reads
a demo run's evaluation rows as its question: does TEC beat its base and the control, by more
than the noise? The run itself is `tec_pipeline.stages.demo`.
"""
