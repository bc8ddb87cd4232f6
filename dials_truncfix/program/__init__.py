"""dials.correct_truncation behind its command line: planning the outputs
(:mod:`.planning`, a frozen plan per imageset), checking and staging them
(:mod:`.outputs`), correcting and writing the images (:mod:`.tasks`, a
result per plan), stopping cleanly on a signal (:mod:`.interruption`), the
corrected experiment lists (:mod:`.experiments`), the JSON record
(:mod:`.record`) and the HTML report (:mod:`.report`)."""
