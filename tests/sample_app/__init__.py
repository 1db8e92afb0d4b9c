"""A sample application that sends mail with asmtp, and its own tests."""
