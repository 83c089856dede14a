"""The built-in demo: its data set and what its report says.

``data`` renders the demo digits (an ImageFolder split by source digit, with a groups file per
split); ``report`` reads a demo run's evaluation rows as its question: does TEC beat its base
and the control, by more than the noise? The run itself is `tec_pipeline.stages.demo`.
"""
