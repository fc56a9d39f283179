"""volumed.text"""
